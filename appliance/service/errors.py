"""Errors in the OpenAI shape: {"error": {"message", "type", "code"}}, for every route."""

from __future__ import annotations

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

# HTTP status -> the OpenAI error type clients switch on.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    501: "invalid_request_error",
    503: "unavailable_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, code: str) -> dict[str, dict[str, str]]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "code": code}}


def body_too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (server.max_request_bytes)"


def error_response(status: int, message: str, code: str,
                   headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error_body(status, message, code))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.message, error.code, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: "no such endpoint; see GET /v1/models, POST /v1/chat/completions, "
                 "POST /v1/completions, GET /health, GET /metrics",
            413: body_too_large(app.config["MAX_CONTENT_LENGTH"]),
        }
        code = (error.name or "error").lower().replace(" ", "_")
        return error_response(status, messages.get(status, error.description or code), code)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        app.logger.exception("unhandled error")
        return error_response(500, "internal error; see the service log", "internal_error")

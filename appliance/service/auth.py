"""Bearer API keys, compared in constant time (the key is read once: settings.read_api_key)."""

from __future__ import annotations

import hmac

from flask import request

from appliance.service.errors import ApiError


def require_api_key(key: bytes | None) -> None:
    """Raise a 401 ApiError unless the request carries `key` as a bearer token."""
    if key is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "missing_api_key", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(presented.strip().encode(), key):
        raise ApiError(401, "wrong API key", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

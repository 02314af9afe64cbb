"""The Flask application factory."""

from __future__ import annotations

import time
import uuid

from flask import Flask, Response, request

from appliance.service import api, health
from appliance.service.auth import require_api_key
from appliance.service.engine import Engine
from appliance.service.errors import register_error_handlers
from appliance.service.metrics import Metrics
from appliance.settings import Settings, read_api_key

# Endpoints anyone may call: monitoring must see health without holding the key.
PUBLIC_ENDPOINTS = frozenset({"ops.health"})


def create_app(settings: Settings, engine: Engine | None = None) -> Flask:
    """Build the app around an engine (loaded or still loading) for these settings."""
    engine = engine or Engine(settings.model, settings.limits, settings.paths.state_dir)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.server.max_request_bytes,
        TRUSTED_HOSTS=settings.server.effective_trusted_hosts,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    api_key = read_api_key(settings.server.api_key_file) if settings.server.api_key_file else None
    metrics = Metrics(engine, settings.paths.hardware_root, settings.verify_state_file)
    app.extensions.update({
        "appliance.settings": settings,
        "appliance.engine": engine,
        "appliance.metrics": metrics,
        "appliance.started": time.monotonic(),
        # Names this process in /health; a verification result counts only for the instance
        # it measured.
        "appliance.instance_id": uuid.uuid4().hex,
    })

    @app.before_request
    def _authenticate() -> None:
        if request.endpoint not in PUBLIC_ENDPOINTS:
            require_api_key(api_key)

    @app.after_request
    def _count(response: Response) -> Response:
        if api.is_verification(request):
            return response
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    register_error_handlers(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    return app

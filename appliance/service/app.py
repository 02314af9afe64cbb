"""The Flask application factory."""

from __future__ import annotations

import logging
import secrets
import time
import uuid

from flask import Flask, Response, g, request

from appliance.service import api, health, status_page
from appliance.service.auth import FailedAuthentications, require_api_key
from appliance.service.engine import Engine
from appliance.service.errors import register_error_handlers
from appliance.service.guards import check_host, check_origin, host_name
from appliance.service.metrics import Metrics
from appliance.settings import Settings, read_api_key
from appliance.util import write_atomically

log = logging.getLogger(__name__)

# Endpoints anyone may call: monitoring must see health without holding the key.
PUBLIC_ENDPOINTS = frozenset({"ops.health", "status.status_page"})


def create_app(settings: Settings, engine: Engine | None = None) -> Flask:
    """Build the app around an engine (loaded or still loading) for these settings."""
    engine = engine or Engine(settings.model, settings.limits, settings.paths.state_dir)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.server.max_request_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    trusted = settings.server.effective_trusted_hosts
    allowed_hosts = None if trusted is None else frozenset(map(host_name, trusted))
    api_key = read_api_key(settings.server.api_key_file) if settings.server.api_key_file else None
    failed_authentications = FailedAuthentications()
    instance_id = uuid.uuid4().hex

    def status(verification: dict | None) -> str:
        return health.service_status(engine, settings, instance_id, verification)[0]

    metrics = Metrics(engine, settings.paths.hardware_root, settings.verify_state_file,
                      settings.paths.models_dir, status, health.STATUSES)
    # The verifier proves it is the verifier with this, read from the state directory that only
    # the service's user can read; a header anyone could send would hide requests from metrics.
    verification_token = secrets.token_hex(16)
    try:
        write_atomically(settings.verification_token_file, verification_token.encode())
    except OSError as error:  # `appliance serve` run by hand, without the unit's state directory
        log.warning("cannot write %s (%s): a verification's requests will count in the "
                    "metrics as users'", settings.verification_token_file, error.strerror)
    app.extensions.update({
        "appliance.settings": settings,
        "appliance.engine": engine,
        "appliance.metrics": metrics,
        "appliance.started": time.monotonic(),
        # Names this process in /health; a verification result counts only for the instance
        # it measured.
        "appliance.instance_id": instance_id,
        "appliance.verification_token": verification_token,
    })

    @app.before_request
    def _guard() -> None:
        g.arrived = time.monotonic()
        check_host(request, allowed_hosts)
        check_origin(request)
        if request.endpoint not in PUBLIC_ENDPOINTS:
            require_api_key(api_key, failed_authentications)

    @app.after_request
    def _count(response: Response) -> Response:
        if api.is_verification(request):
            return response
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        arrived = g.get("arrived", time.monotonic())
        # A stream's body is written after this returns: its duration ends when it closes.
        response.call_on_close(lambda: metrics.request_duration.labels(endpoint).observe(
            time.monotonic() - arrived))
        return response

    register_error_handlers(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(status_page.bp)
    return app

"""What monitoring polls: GET /health (no key) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__, hardware
from .engine import Engine, EngineState

bp = Blueprint("ops", __name__)


def read_verification(path: Path) -> dict[str, Any] | None:
    """The verifier's last result, or None when there is none (or it is unreadable)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def engine_status(engine: Engine) -> str:
    """ok, stalled, or the engine state that keeps it from serving (loading, failed, ...)."""
    if engine.state is not EngineState.READY:
        return engine.state.value
    return "stalled" if engine.is_stalled() else "ok"


def board_facts(root: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    model = hardware.board_model(root)
    if model is not None:
        facts["model"] = model
    temperature = hardware.soc_temperature_celsius(root)
    if temperature is not None:
        facts["soc_temperature_celsius"] = temperature
    throttle = hardware.throttle_state(root)
    if throttle is not None:
        facts["throttle"] = throttle.as_dict()
    return facts


@bp.get("/health")
def health() -> tuple[Response, int]:
    engine: Engine = current_app.extensions["appliance.engine"]
    settings = current_app.extensions["appliance.settings"]
    status = engine_status(engine)
    body: dict[str, Any] = {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - current_app.extensions["appliance.started"],
                                1),
        "model": engine.facts.as_dict() if engine.facts else None,
        "engine": {"state": engine.state.value, "detail": engine.status_line,
                   "busy": engine.busy, "queue_depth": engine.queue_depth,
                   "heartbeat_age_seconds": round(engine.heartbeat_age(), 3),
                   "stall_seconds": settings.limits.stall_seconds},
        "verification": read_verification(settings.verify_state_file),
        "board": board_facts(settings.paths.hardware_root),
    }
    if engine.failure is not None:
        body["error"] = str(engine.failure)
    return jsonify(body), 200 if status == "ok" else 503


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions["appliance.metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

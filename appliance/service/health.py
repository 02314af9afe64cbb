"""What monitoring polls: GET /health (no key) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import generate_latest

from appliance import __version__
from appliance.hardware import sysfs
from appliance.service.engine import Engine, EngineState
from appliance.service.metrics import CONTENT_TYPE
from appliance.settings import Settings
from appliance.util import filesystem_space, read_state_file

bp = Blueprint("ops", __name__)


def engine_status(engine: Engine) -> str:
    """ok, stalled, or the engine state that keeps it from serving (loading, failed, ...)."""
    if engine.state is not EngineState.READY:
        return engine.state.value
    return "stalled" if engine.is_stalled() else "ok"


VERIFIER = {
    "service": "waiting for the speed verification of this start, which the service runs itself",
    "unit": "waiting for the speed verification of this start, which "
            "pi-llm-appliance-verify.service runs (or run `pi-appliance verify`)",
}


def provisioning_step(settings: Settings) -> str | None:
    """The step a flashed image's first boot is at; None once it is done (or never ran)."""
    state = read_state_file(settings.first_boot_state_file)
    if state is None or state.get("state") == "done":
        return None
    return str(state.get("step") or "starting")


def service_status(engine: Engine, settings: Settings, instance_id: str,
                   verification: dict[str, Any] | None) -> tuple[str, str | None]:
    """The status monitoring acts on, and why it is not "ok".

    provisioning (a first boot's steps) → loading → verifying → ok: a load balancer must not
    send traffic into a running benchmark, so a loaded model counts only once a verification of
    *this* instance has finished. Below target, `verify.on_fail` decides: "degraded" keeps
    serving (200), "refuse" does not (503).
    """
    step = provisioning_step(settings)
    if step is not None and engine.state is not EngineState.STOPPING:
        return "provisioning", step
    status = engine_status(engine)
    if status != "ok" or not settings.verify.enabled:
        return status, None
    if not verification or verification.get("instance_id") != instance_id:
        return "verifying", VERIFIER[settings.verify.by]
    if verification.get("result") == "pass":
        return "ok", None
    reason = str(verification.get("reason"))
    return ("degraded" if settings.verify.on_fail == "degraded" else "refused"), reason


HEALTHY = frozenset({"ok", "degraded"})
# Every status service_status() can give, as /metrics lists them.
STATUSES = ("provisioning", "loading", "verifying", "ok", "degraded", "refused", "stalled",
            "failed", "stopping")


def board_facts(root: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    model = sysfs.board_model(root)
    if model is not None:
        facts["model"] = model
    temperature = sysfs.soc_temperature_celsius(root)
    if temperature is not None:
        facts["soc_temperature_celsius"] = temperature
    throttle = sysfs.throttle_state(root)
    if throttle is not None:
        facts["throttle"] = throttle.as_dict()
    return facts


def health_report() -> dict[str, Any]:
    """What GET /health answers (and the status page shows a part of)."""
    engine: Engine = current_app.extensions["appliance.engine"]
    settings: Settings = current_app.extensions["appliance.settings"]
    instance_id = current_app.extensions["appliance.instance_id"]
    verification = read_state_file(settings.verify_state_file)
    status, reason = service_status(engine, settings, instance_id, verification)
    progress, speed = engine.prompt_progress, engine.prompt_tokens_per_second
    body: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "instance_id": instance_id,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - current_app.extensions["appliance.started"],
                                1),
        "model": engine.facts.as_dict() if engine.facts else None,
        "engine": {"state": engine.state.value, "detail": engine.status_line,
                   "busy": engine.busy, "queue_depth": engine.queue_depth,
                   "prompt": asdict(progress) if progress else None,
                   "prompt_tokens_per_second": speed and round(speed, 1),
                   "heartbeat_age_seconds": round(engine.heartbeat_age(), 3),
                   "stall_seconds": round(engine.stall_limit(), 1)},
        "verification": _summary(verification),
        "model_policy": {"policy": settings.model.policy,
                         "fallback": read_state_file(settings.fallback_state_file)},
        "board": board_facts(settings.paths.hardware_root),
        "storage": dict(zip(("models_free_bytes", "models_size_bytes"), space, strict=True))
                   if (space := filesystem_space(settings.paths.models_dir)) else None,
    }
    if engine.failure is not None:
        body["error"] = str(engine.failure)
    return body


@bp.get("/health")
def health() -> tuple[Response, int]:
    body = health_report()
    return jsonify(body), 200 if body["status"] in HEALTHY else 503


def _summary(verification: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verdict without the full benchmark report (that stays in the state file)."""
    if verification is None:
        return None
    return {key: value for key, value in verification.items() if key != "report"}


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions["appliance.metrics"].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE)

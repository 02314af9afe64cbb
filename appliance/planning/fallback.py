"""`model.policy = "auto"`: after a verification below target, switch to a faster variant.

One step per verification. The step picks, among the catalog variants that fit this device and are
predicted faster than the active one, the best-quality one predicted to reach the target (else the
fastest), provided it is installed or installable without a person (a pinned checksum). The
prediction is anchored on the speed just measured: the device's effective bandwidth is whatever
makes the bandwidth model reproduce that measurement. The step installs and activates the variant
through the model store, records itself in `<state_dir>/fallback.json` (shown by /health), and
leaves `<state_dir>/restart-requested`, which the verify unit's privileged `ExecStartPost=` turns
into a restart of the service; the restarted service is verified again. The verifier itself has no
privilege to restart anything.

Bounded: after `model.fallback_attempts` steps, or when nothing faster is available, it stops and
says why. Someone activating another model by hand starts a fresh history.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.exitcodes import ApplianceError
from appliance.hardware.detect import detect
from appliance.hardware.profiles import load_profiles
from appliance.models.catalog import Variant, load_catalog
from appliance.models.store import ModelStore
from appliance.planning.planner import (
    bandwidth_reproducing,
    calibrate,
    device_from_detection,
    faster_alternatives,
    plan,
    plan_request,
)
from appliance.settings import Settings
from appliance.util import now_iso, read_state_file, write_atomically

RESTART_FLAG = "restart-requested"


def active_variant(store: ModelStore, catalog: dict[str, Variant]) -> Variant | None:
    active = store.active()
    if active is None:
        return None
    sha256 = active.name.removesuffix(".gguf")
    by_record = catalog.get(str(store.record(sha256).get("catalog_id")))
    return by_record or next((v for v in catalog.values() if v.sha256 == sha256), None)


def history(settings: Settings, store: ModelStore) -> dict[str, Any]:
    """The steps taken since a person last chose the model."""
    recorded = read_state_file(settings.fallback_state_file) or {}
    active = store.active()
    if recorded.get("active_sha256") != (active.name.removesuffix(".gguf") if active else None):
        return {"attempts": []}  # the model was changed by hand since: a fresh start
    return recorded


def _save(settings: Settings, record: dict[str, Any]) -> dict[str, Any]:
    write_atomically(settings.fallback_state_file, json.dumps(record, indent=2).encode())
    return record


def fall_back(settings: Settings, verdict: dict[str, Any], progress) -> dict[str, Any] | None:
    """Take one fallback step after `verdict` (a failed verification); return the history."""
    if settings.model.policy != "auto" or verdict.get("result") != "fail":
        return None
    store = ModelStore(settings.paths.models_dir, progress)
    record = history(settings, store)
    record.pop("stopped", None)

    def stop(reason: str) -> dict[str, Any]:
        progress(f"fallback: {reason}")
        active = store.active()
        return _save(settings, record | {"stopped": reason, "at": now_iso(), "active_sha256":
                                         active.name.removesuffix(".gguf") if active else None})

    conditions = verdict.get("report", {}).get("conditions", {})
    if not conditions.get("valid", True):
        return stop(f"this measurement is not valid ({conditions.get('invalid_reason')}): the "
                    "model is not switched on it; the next verification decides")
    if len(record["attempts"]) >= settings.model.fallback_attempts:
        return stop(f"all {settings.model.fallback_attempts} fallback attempts are used; "
                    "the model stays as it is")
    catalog = load_catalog()
    current = active_variant(store, catalog)
    if current is None:
        return stop("the active model is not a catalog variant (or there is no model store at "
                    f"{store.directory}): there is nothing to compare it with")
    calibration = calibrate(catalog, load_profiles())
    request = plan_request(settings)
    # Anchored on what was just measured on this device.
    bandwidth = bandwidth_reproducing(calibration, current, verdict["measured_tps"],
                                      request.depth, request.kv_type)
    report = detect(settings.paths.hardware_root, {"models": settings.paths.models_dir})
    device = device_from_detection(report, settings.paths.state_dir, bandwidth)
    result = plan(device, request, catalog, calibration)
    available = [c for c in faster_alternatives(current, result) if store.installable(c.variant)]
    if not available:
        return stop(f"no variant faster than {current.id} fits this device and is installed "
                    "or installable with a pinned checksum")
    meeting = [c for c in available if c.meets_target]
    chosen = meeting[0] if meeting else max(available, key=lambda c: c.predicted_tps)
    progress(f"fallback: {current.id} measured {verdict['measured_tps']:.2f} tok/s; switching "
             f"to {chosen.variant.id} (predicted {chosen.predicted_tps:.1f} tok/s)")
    try:
        model = store.install_variant(chosen.variant)
    except ApplianceError as error:
        return stop(f"installing {chosen.variant.id} failed: {error}")
    record["attempts"].append({
        "at": now_iso(), "from": current.id, "to": chosen.variant.id,
        "measured_tps": verdict["measured_tps"],
        "predicted_tps": round(chosen.predicted_tps, 2), "reason": verdict.get("reason")})
    record["active_sha256"] = model.name.removesuffix(".gguf")
    _save(settings, record)
    write_atomically(settings.paths.state_dir / RESTART_FLAG, f"{now_iso()}\n".encode())
    return record

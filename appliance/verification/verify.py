"""`pi-appliance verify`: measure the running service's decode speed and judge it.

Run by `pi-llm-appliance-verify.service` after every start. It waits for the service to load its
model, benchmarks it through its own API (streaming, tagged so the service keeps these requests
out of its user metrics), compares the median decode rate at `verify.depth` (0: as the published
figures are measured) with `verify.target_tps`, reports a second rate at
`verify.conversation_depth` beside it, and writes the verdict atomically to
`<state_dir>/verify.json`, which /health reads. The verdict names the service instance it
measured, so a result from before a restart never counts for the process that replaced it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.planning.fallback import fall_back
from appliance.settings import VERIFICATION_HEADER, Settings, read_api_key
from appliance.util import fetch_health, now_iso, read_state_file, write_atomically
from appliance.verification.bench import BenchSpec, Endpoint, ThroughService, bench

log = logging.getLogger(__name__)

PASS, FAIL, ERROR = "pass", "fail", "error"
EXIT_CODES = {PASS: ExitCode.OK, FAIL: ExitCode.NOT_OK, ERROR: ExitCode.UNREACHABLE}


def wait_until_loaded(url: str, wait_seconds: float) -> dict[str, Any]:
    """Poll /health until the model is loaded; the body then describes what will be measured."""
    deadline = time.monotonic() + wait_seconds
    last_problem = "no answer"
    while time.monotonic() < deadline:
        try:
            body = fetch_health(url)
        except (OSError, ValueError) as error:
            last_problem = str(error)
        else:
            if body.get("status") == "failed":
                raise ApplianceError(f"the service failed to load its model: {body.get('error')}",
                                     ExitCode.UNREACHABLE)
            if body.get("model") and body.get("status") != "loading":
                return body
            last_problem = f"status {body.get('status')}"
        time.sleep(2)
    raise ApplianceError(f"{url} was not ready within {wait_seconds:.0f} s ({last_problem})",
                         ExitCode.UNREACHABLE)


def _verification_header(settings: Settings) -> dict[str, str]:
    """The header that keeps the verifier's requests out of the users' metrics; none (and
    counted as users') when the service's token cannot be read."""
    try:
        token = settings.verification_token_file.read_text().strip()
    except OSError as error:
        log.warning("cannot read %s (%s): the verification's requests will count in the "
                    "service's metrics", settings.verification_token_file, error.strerror)
        return {}
    return {VERIFICATION_HEADER: token}


def judge(measured_tps: float, settings: Settings) -> tuple[str, str]:
    target = settings.verify.target_tps
    threshold = target * (1 - settings.verify.tolerance)
    if measured_tps >= threshold:
        return PASS, (f"{measured_tps:.2f} tok/s at depth {settings.verify.depth} meets the "
                      f"target {target:g} tok/s (pass at ≥ {threshold:.2f})")
    return FAIL, (f"{measured_tps:.2f} tok/s at depth {settings.verify.depth} is below the "
                  f"target {target:g} tok/s (pass at ≥ {threshold:.2f})")


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Atomically: a crash mid-write leaves the previous verdict, never half a file."""
    write_atomically(path, json.dumps(result, indent=2).encode())


def verify(settings: Settings,
           progress=lambda message: log.info("%s", message)) -> dict[str, Any] | None:
    """Verify the running service; write and return the verdict.

    A re-check (this instance already has a verdict) waits for an idle moment: it returns None
    without measuring while users are being served, rather than queueing behind them and slowing
    them down. The first check after a start always runs: until it has, /health says "verifying".
    """
    url = settings.server.local_url
    config = settings.verify
    result: dict[str, Any] = {
        "target_tps": config.target_tps, "tolerance": config.tolerance, "depth": config.depth,
        "on_fail": config.on_fail,
    }
    health: dict[str, Any] = {}
    try:
        health = wait_until_loaded(url, config.wait_seconds)
        previous = read_state_file(settings.verify_state_file)
        recheck = previous is not None and previous.get("instance_id") == health["instance_id"]
        if recheck and (health["engine"]["busy"] or health["engine"]["queue_depth"]):
            progress("the service is serving users; re-check skipped until it is idle")
            return None
        api_key = (read_api_key(settings.server.api_key_file)
                   if settings.server.api_key_file else None)
        spec = BenchSpec(depths=config.depths, n_prompt=config.n_prompt, n_gen=config.n_gen,
                         repetitions=config.repetitions)
        endpoint = Endpoint(url, api_key, headers=_verification_header(settings))
        report = bench(ThroughService(endpoint, spec), spec, progress,
                       settings.paths.hardware_root)
        rates = {row["depth"]: row["tg_tokens_per_second"]["median"]
                 for row in report["results"]}
        measured = rates.pop(config.depth)
        verdict, reason = judge(measured, settings)
        for depth, rate in rates.items():  # the conversation figure, when there is one
            result["conversation"] = {"depth": depth, "measured_tps": rate}
            reason += f"; {rate:.2f} tok/s at depth {depth} (not gated)"
        if not report["conditions"]["valid"]:
            reason += f"; {report['conditions']['invalid_reason']}"
        result |= {"result": verdict, "reason": reason, "measured_tps": measured,
                   "instance_id": health.get("instance_id"), "model": health["model"],
                   "report": report}
    except ApplianceError as error:
        result |= {"result": ERROR, "reason": f"could not measure: {error}",
                   "measured_tps": None, "instance_id": health.get("instance_id")}
    result["timestamp"] = now_iso()
    write_result(settings.verify_state_file, result)
    progress(f"verification {result['result']}: {result['reason']}")
    steps = fall_back(settings, result, progress)
    if steps is not None:
        result["fallback"] = steps
        write_result(settings.verify_state_file, result)
    return result

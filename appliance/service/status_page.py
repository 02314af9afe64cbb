"""GET /: the status page a technician opens on a phone on the same network.

No key, no script, no external asset (a Content-Security-Policy holds the page to that); it
refreshes itself. It shows what /health says in words, and nothing a stranger on the LAN should
not see: no key, no path, no error text (which may hold paths) — those are for the journal.
"""

from __future__ import annotations

import socket
from typing import Any

from flask import Blueprint, Response, render_template

from appliance import __version__
from appliance.service.health import health_report

bp = Blueprint("status", __name__)

REFRESH_SECONDS = 5
# The state as a technician reads it: a headline, what it means, and a colour class.
STATES: dict[str, tuple[str, str, str]] = {
    "provisioning": ("Setting up", "First boot is preparing this board. It takes a few "
                     "minutes; leave it powered.", "busy"),
    "loading": ("Loading the model", "The model is being read into memory.", "busy"),
    "verifying": ("Measuring its speed", "Checking that the model is fast enough on this "
                  "board.", "busy"),
    "ok": ("Ready", "The appliance answers at the speed it promises.", "good"),
    "degraded": ("Slower than promised", "It answers, but below its speed target.", "warn"),
    "refused": ("Too slow: not answering", "It measured below its speed target and refuses "
                "requests until that is fixed.", "bad"),
    "stalled": ("Stuck", "A request has made no progress for too long; the service restarts "
                "itself.", "bad"),
    "failed": ("Failed", "The model could not be loaded. Its log says why: "
               "journalctl -u pi-llm-appliance.", "bad"),
    "stopping": ("Stopping", "The service is shutting down.", "busy"),
}
THROTTLE_WORDS = {"under_voltage": "under-voltage (check the power supply)",
                  "frequency_capped": "frequency capped", "throttled": "throttled (too hot)",
                  "soft_temperature_limit": "at its soft temperature limit"}


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "min")]
    shown = [f"{value} {unit}" for value, unit in parts if value] or ["under a minute"]
    return " ".join(shown[:2])


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB"


def _throttling(board: dict[str, Any]) -> str:
    """What the firmware reports, now and since boot, in words."""
    throttle = board.get("throttle")
    if throttle is None:
        return "not reported"

    def words(flags: dict[str, bool]) -> str:
        return ", ".join(THROTTLE_WORDS.get(name, name.replace("_", " "))
                         for name, on in flags.items() if on) or "none"

    return f"now: {words(throttle['now'])}; since boot: {words(throttle['since_boot'])}"


def page_facts(report: dict[str, Any]) -> dict[str, Any]:
    """What the page shows, from a /health report."""
    status = report["status"]
    headline, meaning, tone = STATES[status]
    verification = report.get("verification") or {}
    board, storage = report.get("board") or {}, report.get("storage")
    measured, target = verification.get("measured_tps"), verification.get("target_tps")
    return {
        "status": status, "headline": headline, "meaning": meaning, "tone": tone,
        "step": report["reason"] if status == "provisioning" else None,
        "model": (report.get("model") or {}).get("id"),
        "speed": (f"{measured:.1f} tokens/s (target {target:g})" if measured is not None
                  and target is not None else "not measured yet"),
        "speed_verdict": verification.get("result"),
        "temperature": (f"{board['soc_temperature_celsius']:.0f} °C"
                        if "soc_temperature_celsius" in board else "not reported"),
        "throttling": _throttling(board),
        "uptime": _duration(report["uptime_seconds"]),
        "disk": (f"{_gigabytes(storage['models_free_bytes'])} free of "
                 f"{_gigabytes(storage['models_size_bytes'])}" if storage else "not reported"),
        "board": board.get("model"), "hostname": socket.gethostname(),
        "version": __version__, "refresh": REFRESH_SECONDS,
    }


@bp.get("/")
def status_page() -> Response:
    response = Response(render_template("status.html", **page_facts(health_report())))
    response.headers.update({
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    })
    return response

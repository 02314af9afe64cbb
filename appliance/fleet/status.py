"""`fleet status`: one row per host, from the Pi's own /health and a look at the machine."""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass, field

from appliance import layout
from appliance.fleet.inventory import Host
from appliance.fleet.remote import DEFAULT_TIMEOUT, HostResult, Unreachable, connected
from appliance.util import aligned

# Where the Pi 5 starts to throttle (firmware soft limit).
HOT_CELSIUS = 80.0
LOW_DISK_BYTES = 2 * 1024**3  # less than a small model's install
_SEPARATOR = "--- pi-llm-appliance fleet ---"


@dataclass
class Row(HostResult):
    reachable: bool
    status: str | None = None  # /health's: ok, degraded, verifying, ...
    model: str | None = None
    verified_tps: float | None = None
    target_tps: float | None = None
    soc_temperature_celsius: float | None = None
    throttled_now: list[str] = field(default_factory=list)
    uptime_seconds: float | None = None
    disk_free_bytes: int | None = None


def _probe_command(host: Host, timeout: float) -> str:
    # One round trip: health (whatever its status code), uptime, free space where models go.
    health = f"curl -sS -m {timeout:g} {shlex.quote(host.local_url + '/health')}"
    models = shlex.quote(str(layout.MODELS_DIR))
    return (f"{health}; echo; echo {_SEPARATOR}; cat /proc/uptime; echo {_SEPARATOR}; "
            f"df -P -B1 {models} 2>/dev/null || df -P -B1 /")


def row_from(host: Host, health_text: str, uptime_text: str, df_text: str) -> Row:
    row = Row(host.name, reachable=True)
    # Left out of the row, not guessed, when the Pi printed something else.
    with contextlib.suppress(IndexError, ValueError):
        row.uptime_seconds = float(uptime_text.split()[0])
    with contextlib.suppress(IndexError, ValueError):
        row.disk_free_bytes = int(df_text.strip().splitlines()[-1].split()[3])
    try:
        health = json.loads(health_text)
    except ValueError:
        row.problems.append(f"the service does not answer on {host.local_url}: "
                            f"{health_text.strip()[-200:] or 'no answer'}")
        return row
    row.status = health.get("status")
    row.model = (health.get("model") or {}).get("id")
    verification = health.get("verification") or {}
    row.verified_tps = verification.get("measured_tps")
    row.target_tps = verification.get("target_tps")
    board = health.get("board") or {}
    row.soc_temperature_celsius = board.get("soc_temperature_celsius")
    now = (board.get("throttle") or {}).get("now") or {}
    row.throttled_now = sorted(condition for condition, active in now.items() if active)
    if row.status != "ok":
        reason = health.get("reason")
        row.problems.append(f"status {row.status}" + (f": {reason}" if reason else ""))
    if row.throttled_now:
        row.problems.append("throttled now: " + ", ".join(row.throttled_now))
    if row.soc_temperature_celsius is not None and row.soc_temperature_celsius >= HOT_CELSIUS:
        row.problems.append(f"SoC at {row.soc_temperature_celsius:g} °C")
    if row.disk_free_bytes is not None and row.disk_free_bytes < LOW_DISK_BYTES:
        row.problems.append(f"{row.disk_free_bytes / 1e9:.1f} GB free")
    return row


def probe(host: Host, timeout: float = DEFAULT_TIMEOUT) -> Row:
    try:
        with connected(host, timeout) as session:
            output = session.run(_probe_command(host, timeout), timeout + 10)
    except Unreachable as error:
        return Row(host.name, reachable=False, problems=[f"unreachable: {error}"])
    parts = output.stdout.split(_SEPARATOR)
    if len(parts) != 3:
        return Row(host.name, reachable=True, problems=[
            f"the status command failed ({output.exit_code}): {output.stderr.strip()[-300:]}"])
    return row_from(host, *parts)


def _format(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def status_table(rows: list) -> str:
    header = ["host", "status", "model", "tok/s", "target", "°C", "throttled", "uptime",
              "disk free", "problems"]
    lines = [header]
    for row in rows:
        lines.append([
            row.marked_host,
            row.status or ("unreachable" if not row.reachable else "-"),
            row.model or "-",
            _format(row.verified_tps), _format(row.target_tps),
            _format(row.soc_temperature_celsius),
            ",".join(row.throttled_now) or ("no" if row.status else "-"),
            "-" if row.uptime_seconds is None else f"{row.uptime_seconds / 3600:.1f} h",
            "-" if row.disk_free_bytes is None else f"{row.disk_free_bytes / 1e9:.1f} GB",
            "; ".join(row.problems) or "-",
        ])
    return aligned(lines)

"""`fleet bench`: `pi-appliance bench` through each Pi's own service, run on the Pi, gathered into
one table. One host at a time by default: Pis that share a switch or a mirror are not to be
measured while another saturates it."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from appliance import layout
from appliance.fleet.inventory import Host
from appliance.fleet.remote import CLI, CannotBecomeRoot, HostResult, Unreachable, connected
from appliance.util import aligned

DEFAULT_BENCH_TIMEOUT = 3600.0  # seconds for one host's whole benchmark


@dataclass
class Benched(HostResult):
    report: dict[str, Any] | None = None  # `pi-appliance bench --json`'s


def bench_command(host: Host, spec_arguments: list[str]) -> str:
    # The API key is root's to read; a Pi without one serves loopback without a key.
    key = shlex.quote(str(layout.API_KEY_FILE))
    bench = shlex.join([CLI, "bench", "--url", host.local_url, "--json", *spec_arguments])
    return f'set --; if [ -e {key} ]; then set -- --api-key-file {key}; fi; exec {bench} "$@"'


def bench_host(host: Host, spec_arguments: list[str], timeout: float,
               bench_timeout: float) -> Benched:
    benched = Benched(host.name)
    try:
        with connected(host, timeout) as session:
            output = session.run(bench_command(host, spec_arguments), bench_timeout,
                                 as_root=True)
    except Unreachable as error:
        benched.problems.append(f"unreachable: {error}")
        return benched
    except CannotBecomeRoot as error:
        benched.problems.append(str(error))
        return benched
    try:
        benched.report = json.loads(output.stdout)
    except ValueError:
        benched.problems.append(f"the benchmark failed ({output.exit_code}): "
                                f"{output.stderr.strip()[-300:] or 'no output'}")
        return benched
    conditions = benched.report.get("conditions", {})
    if not conditions.get("valid", False):
        benched.problems.append(f"not comparable: {conditions.get('invalid_reason')}")
    return benched


def bench_table(rows: list[Benched]) -> str:
    header = ["host", "model", "threads", "depth", "pp tok/s", "tg tok/s", "TTFT ms", "problems"]
    lines = [header]
    for row in rows:
        problems = "; ".join(row.problems) or "-"
        if row.report is None:
            lines.append([row.marked_host, "-", "-", "-", "-", "-", "-", problems])
            continue
        model = row.report.get("model") or {}
        for result in row.report.get("results", []):
            pp, tg = result["pp_tokens_per_second"], result["tg_tokens_per_second"]
            lines.append([row.marked_host, str(model.get("id") or "-"),
                          str(row.report.get("threads") or "-"), str(result["depth"]),
                          f"{pp['median']:.1f} ± {pp['stdev']:.1f}",
                          f"{tg['median']:.2f} ± {tg['stdev']:.2f}",
                          f"{result['time_to_first_token_ms']['median']:.0f}", problems])
    return aligned(lines)

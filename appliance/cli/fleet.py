"""`pi-appliance fleet …`: the control machine's view of many appliances, read from the same
Ansible inventory that provisions them (needs the `control` extra: ansible-core and fabric)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from appliance import layout
from appliance.exitcodes import ApplianceError, ExitCode

DEFAULT_KEYS_DIR = Path("/etc/prometheus/pi-llm-appliance-keys")
SERVICE_UNIT = layout.UNITS[0]


def _hosts(args: argparse.Namespace) -> list:
    from appliance.fleet.inventory import read_inventory

    return read_inventory(args.inventory, args.limit)


def _format(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def status_table(rows: list) -> str:
    header = ["host", "status", "model", "tok/s", "target", "°C", "throttled", "uptime",
              "disk free", "problems"]
    lines = [header]
    for row in rows:
        lines.append([
            ("! " if not row.healthy else "  ") + row.host,
            row.status or ("unreachable" if not row.reachable else "-"),
            row.model or "-",
            _format(row.verified_tps), _format(row.target_tps),
            _format(row.soc_temperature_celsius),
            ",".join(row.throttled_now) or ("no" if row.status else "-"),
            "-" if row.uptime_seconds is None else f"{row.uptime_seconds / 3600:.1f} h",
            "-" if row.disk_free_bytes is None else f"{row.disk_free_bytes / 1e9:.1f} GB",
            "; ".join(row.problems) or "-",
        ])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths,
                                                                       strict=True))
                     + "  " + line[-1] for line in lines)


def _status(args: argparse.Namespace) -> int:
    from appliance.fleet.remote import each
    from appliance.fleet.status import probe

    rows = each(_hosts(args), lambda host: probe(host, args.timeout), args.parallel)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    elif args.csv:
        out = io.StringIO()
        fields = list(rows[0].as_dict())
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ";".join(value) if isinstance(value, list) else value
                             for key, value in row.as_dict().items()})
        print(out.getvalue(), end="")
    else:
        print(status_table(rows))
        unhealthy = sum(not row.healthy for row in rows)
        print(f"\n{len(rows) - unhealthy} of {len(rows)} healthy")
    return ExitCode.OK if all(row.healthy for row in rows) else ExitCode.NOT_OK


def _logs(args: argparse.Namespace) -> int:
    from appliance.fleet.inventory import read_inventory
    from appliance.fleet.remote import Unreachable, connected

    hosts = read_inventory(args.inventory, args.host)
    if len(hosts) != 1:
        raise ApplianceError(f"{args.host!r} names {len(hosts)} hosts "
                             f"({', '.join(host.name for host in hosts)}); logs shows one",
                             ExitCode.USAGE)
    [host] = hosts
    command = ["journalctl", "--no-pager", "-u", SERVICE_UNIT, "-n", str(args.lines)]
    if args.since:
        command += ["--since", args.since]
    try:
        with connected(host, args.timeout) as run:
            output = run(shlex.join(command), args.timeout + 30)
    except Unreachable as error:
        raise ApplianceError(f"{host.name}: {error}", ExitCode.UNREACHABLE) from None
    sys.stdout.write(output.stdout)
    sys.stderr.write(output.stderr)
    return ExitCode.OK if output.exit_code == 0 else ExitCode.NOT_OK


def _prometheus_config(args: argparse.Namespace) -> int:
    from appliance.fleet import prometheus

    hosts = _hosts(args)
    for path in prometheus.write(args.output, hosts, args.keys_dir, args.scrape_interval):
        print(path)
    missing = [host.name for host in hosts if not (args.keys_dir / host.name).is_file()]
    if missing:
        print(f"note: no API key in {args.keys_dir} for {', '.join(missing)}; put each Pi's "
              f"there under its inventory name (ssh <pi> sudo cat {layout.API_KEY_FILE}), "
              "readable by Prometheus' user only", file=sys.stderr)
    loopback = [host.name for host in hosts if host.service_host.startswith("127.")]
    if loopback:
        print(f"note: the API of {', '.join(loopback)} listens on loopback only; set "
              "service_host (and an API key) for Prometheus to reach it", file=sys.stderr)
    return ExitCode.OK


def add_commands(commands: Any) -> None:
    from appliance.fleet.remote import DEFAULT_PARALLEL, DEFAULT_TIMEOUT

    fleet = commands.add_parser("fleet", help="see and act on many appliances (the Ansible "
                                "inventory's `appliances`; needs the control extra)")
    verbs = fleet.add_subparsers(dest="fleet_command", required=True, parser_class=type(fleet))

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-i", "--inventory", type=Path, default=None,
                            help="Ansible inventory (default: ansible.cfg's)")
        parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                            help=f"seconds for each connection and command (default "
                                 f"{DEFAULT_TIMEOUT:g})")

    status = verbs.add_parser("status", help="one row per host: status, model, verified tok/s, "
                              "temperature, throttling, uptime, disk; exit 0 only if all healthy")
    common(status)
    status.add_argument("-l", "--limit", help="an Ansible host pattern")
    status.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL,
                        help=f"hosts at once (default {DEFAULT_PARALLEL})")
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="CSV instead of a table")
    status.set_defaults(handler=_status)

    logs = verbs.add_parser("logs", help="the service's journal on one host")
    common(logs)
    logs.add_argument("host", help="the host's inventory name")
    logs.add_argument("--since", help="as journalctl takes it, e.g. '1 hour ago' or 2026-12-01")
    logs.add_argument("-n", "--lines", type=int, default=200, help="at most this many (200)")
    logs.set_defaults(handler=_logs)

    config = verbs.add_parser("prometheus-config", help="scrape targets, the scrape job, alert "
                              "rules and a Grafana dashboard for the inventory's appliances")
    common(config)
    config.add_argument("-l", "--limit", help="an Ansible host pattern")
    config.add_argument("-o", "--output", type=Path, required=True,
                        help="directory for the files (e.g. /etc/prometheus/pi-llm-appliance)")
    config.add_argument("--keys-dir", type=Path, default=DEFAULT_KEYS_DIR,
                        help="where Prometheus reads each Pi's API key at each scrape, one file "
                             f"per inventory name (default {DEFAULT_KEYS_DIR}); never written "
                             "into the configuration")
    config.add_argument("--scrape-interval", default="30s", help="default 30s")
    config.set_defaults(handler=_prometheus_config)

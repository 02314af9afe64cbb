"""`pi-appliance fleet …`: the control machine's view of many appliances, read from the same
Ansible inventory that provisions them (needs the `control` extra: ansible-core and fabric)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import getpass
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

    hosts = read_inventory(args.inventory, args.limit)
    if getattr(args, "ask_become_pass", False):
        password = getpass.getpass("BECOME password: ")
        hosts = [host if host.become_password else dataclasses.replace(
            host, become_password=password) for host in hosts]
    return hosts


def _summary(rows: list, what: str) -> int:
    unhealthy = sum(not row.healthy for row in rows)
    print(f"\n{len(rows) - unhealthy} of {len(rows)} {what}")
    return ExitCode.OK if not unhealthy else ExitCode.NOT_OK


def _as_json(rows: list) -> int:
    print(json.dumps([row.as_dict() for row in rows], indent=2))
    return ExitCode.OK if all(row.healthy for row in rows) else ExitCode.NOT_OK


def _status(args: argparse.Namespace) -> int:
    from appliance.fleet.remote import each
    from appliance.fleet.status import probe, status_table

    rows = each(_hosts(args), lambda host: probe(host, args.timeout), args.parallel)
    if args.json:
        return _as_json(rows)
    if args.csv:
        out = io.StringIO()
        fields = list(rows[0].as_dict())
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ";".join(value) if isinstance(value, list) else value
                             for key, value in row.as_dict().items()})
        print(out.getvalue(), end="")
        return ExitCode.OK if all(row.healthy for row in rows) else ExitCode.NOT_OK
    print(status_table(rows))
    return _summary(rows, "healthy")


def _bench(args: argparse.Namespace) -> int:
    from appliance.cli.bench import spec_arguments
    from appliance.fleet.bench import bench_host, bench_table
    from appliance.fleet.remote import each

    def measured(host: Any) -> Any:
        print(f"{host.name}: measuring", file=sys.stderr, flush=True)
        return bench_host(host, spec_arguments(args), args.timeout, args.bench_timeout)

    rows = each(_hosts(args), measured, args.parallel)
    if args.json:
        return _as_json(rows)
    print(bench_table(rows))
    return _summary(rows, "measured")


def _push_model(args: argparse.Namespace) -> int:
    from appliance.fleet.push import Reporter, local_model, push, pushed_table
    from appliance.fleet.remote import each

    hosts = _hosts(args)
    report = Reporter(lambda line: print(line, file=sys.stderr, flush=True))
    model = local_model(args.source, args.sha256, lambda line: report("here", line))
    max_rate = args.bwlimit * 1e6 if args.bwlimit else None
    rows = each(hosts, lambda host: push(host, model, activate=not args.no_activate,
                                         timeout=args.timeout, report=report,
                                         max_rate=max_rate), args.parallel)
    if args.json:
        return _as_json(rows)
    print(pushed_table(rows, model))
    return _summary(rows, "have it")


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
        with connected(host, args.timeout) as session:
            output = session.run(shlex.join(command), args.timeout + 30)
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
    from appliance.cli.bench import add_spec_arguments
    from appliance.fleet.bench import DEFAULT_BENCH_TIMEOUT
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

    def several(parser: argparse.ArgumentParser, parallel: int, *, required: bool = False,
                as_root: bool = False, output: bool = True) -> None:
        common(parser)
        parser.add_argument("-l", "--limit", "--hosts", required=required, metavar="PATTERN",
                            help="an Ansible host pattern" + (" (all for every appliance)"
                                                              if required else ""))
        parser.add_argument("--parallel", type=int, default=parallel,
                            help=f"hosts at once (default {parallel})")
        if as_root:
            parser.add_argument("-K", "--ask-become-pass", action="store_true",
                                help="ask for sudo's password once, for the hosts whose "
                                     "inventory gives none (ansible_become_password)")
        if output:
            parser.add_argument("--json", action="store_true", help="JSON instead of a table")

    status = verbs.add_parser("status", help="one row per host: status, model, verified tok/s, "
                              "temperature, throttling, uptime, disk; exit 0 only if all healthy")
    several(status, DEFAULT_PARALLEL, output=False)
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="CSV instead of a table")
    status.set_defaults(handler=_status)

    bench = verbs.add_parser("bench", help="`pi-appliance bench` through each Pi's service, on "
                             "the Pi, in one table; one host at a time unless --parallel")
    several(bench, 1, as_root=True)
    add_spec_arguments(bench)
    bench.add_argument("--bench-timeout", type=float, default=DEFAULT_BENCH_TIMEOUT,
                       help=f"seconds for one host's benchmark (default "
                            f"{DEFAULT_BENCH_TIMEOUT:g})")
    bench.set_defaults(handler=_bench)

    push = verbs.add_parser("push-model", help="send a model over SSH and install it as "
                            "`pi-appliance model install` does (checked, atomic); a cut "
                            "transfer resumes where it stopped")
    several(push, 4, required=True, as_root=True)
    push.add_argument("source", help="a GGUF file, or a catalog id an installed Python "
                      "package ships")
    push.add_argument("--sha256", help="the checksum the file must have (checked here before "
                      "sending, and on each Pi)")
    push.add_argument("--no-activate", action="store_true",
                      help="install only (default: activate and restart the running service)")
    push.add_argument("--bwlimit", type=float, metavar="MB/S",
                      help="at most this many megabytes a second to each host (a shared link)")
    push.set_defaults(handler=_push_model)

    logs = verbs.add_parser("logs", help="the service's journal on one host")
    common(logs)
    logs.add_argument("host", help="the host's inventory name")
    logs.add_argument("--since", help="as journalctl takes it, e.g. '1 hour ago' or 2026-12-01")
    logs.add_argument("-n", "--lines", type=int, default=200, help="at most this many (200)")
    logs.set_defaults(handler=_logs)

    config = verbs.add_parser("prometheus-config", help="scrape targets, the scrape job, alert "
                              "rules and a Grafana dashboard for the inventory's appliances")
    common(config)
    config.add_argument("-l", "--limit", "--hosts", metavar="PATTERN",
                        help="an Ansible host pattern")
    config.add_argument("-o", "--output", type=Path, required=True,
                        help="directory for the files (e.g. /etc/prometheus/pi-llm-appliance)")
    config.add_argument("--keys-dir", type=Path, default=DEFAULT_KEYS_DIR,
                        help="where Prometheus reads each Pi's API key at each scrape, one file "
                             f"per inventory name (default {DEFAULT_KEYS_DIR}); never written "
                             "into the configuration")
    config.add_argument("--scrape-interval", default="30s", help="default 30s")
    config.set_defaults(handler=_prometheus_config)

"""The parser of every verb, and the one place where an ApplianceError becomes its exit code."""

from __future__ import annotations

import sys

from appliance import __version__
from appliance.cli import bench, fleet, hardware, model, plan, service
from appliance.exitcodes import ApplianceError
from appliance.util import Parser


def build_parser() -> Parser:
    parser = Parser(prog="pi-appliance", description="A private, offline LLM appliance: serve, "
                    "check, measure, plan and install models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for verbs in (service, hardware, bench, plan, model, fleet):
        verbs.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ApplianceError as exc:
        print(f"pi-appliance: {exc}", file=sys.stderr)
        return int(exc.exit_code)

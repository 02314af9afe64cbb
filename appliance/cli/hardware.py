"""`pi-appliance hw`: what this machine offers a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.cli.options import add_hardware_root, add_json, add_models_dir, add_state_dir
from appliance.exitcodes import ExitCode
from appliance.hardware.detect import detect, format_report
from appliance.hardware.profiles import match


def _hw(args: argparse.Namespace) -> int:
    report = detect(args.root, {"state": args.state_dir, "models": args.models_dir})
    report["profile"] = match(report).key
    print(json.dumps(report, indent=2) if args.json else
          f"{format_report(report)}\nprofile  {report['profile']}")
    return ExitCode.OK


def add_commands(commands: Any) -> None:
    hw = commands.add_parser("hw", help="what this machine offers a model: RAM, CPU, storage")
    add_json(hw)
    add_state_dir(hw)
    add_models_dir(hw)
    add_hardware_root(hw)
    hw.set_defaults(handler=_hw)

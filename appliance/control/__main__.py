"""`python -m appliance.control build-artifacts [llama-cpp] [wheelhouse --python 3.N ...]`:
what provisioning copies to every Pi, built once on the control machine; prints where as JSON.
The roles run it with the collection's root on PYTHONPATH, so it needs nothing installed but
Python."""

from __future__ import annotations

import json
import sys

from appliance.control import artifacts, llamacpp
from appliance.control.host import HostError
from appliance.exitcodes import ExitCode
from appliance.util import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m appliance.control", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    build = commands.add_parser("build-artifacts", help="llama.cpp for the Cortex-A76 and the "
                                "aarch64 wheelhouse; prints JSON")
    build.add_argument("which", nargs="*", metavar="|".join(artifacts.ARTIFACTS),
                       help="only these (default: all)")
    build.add_argument("--python", action="append", default=[], metavar="3.N",
                       help="a CPython version of the Pis the wheelhouse serves; repeat for each")
    commands.add_parser("build-llama-cpp", help="cross-build llama.cpp; print its prefix")
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, "which", [])) - set(artifacts.ARTIFACTS))
    if unknown:
        parser.error(f"unknown artifact {', '.join(unknown)}: choose from "
                     f"{', '.join(artifacts.ARTIFACTS)}")
    try:
        if args.command == "build-artifacts":
            built = artifacts.build(tuple(args.which) or artifacts.ARTIFACTS, tuple(args.python))
            print(json.dumps(built, indent=2))
        else:
            print(llamacpp.ensure_build())
    except HostError as error:
        print(f"appliance.control: error: {error}", file=sys.stderr)
        return ExitCode.UNREACHABLE  # a tool, a download or a build this machine cannot do
    return 0


if __name__ == "__main__":
    sys.exit(main())

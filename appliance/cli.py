"""`pi-appliance`: serve, check a configuration, ask a running service for its health,
benchmark a model or a service, verify the service against its speed target."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__
from .exitcodes import ApplianceError, ExitCode
from .settings import DEFAULT_CONFIG_PATH, load_settings, read_config_file, validate

DEFAULT_HEALTH_URL = "http://127.0.0.1:8080/health"


def _configure_logging(level: str) -> None:
    # Under systemd the journal stamps time and unit itself.
    fmt = ("%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "server": {"host": args.host, "port": args.port, "api_key_file": args.api_key_file},
        "model": {"path": args.model, "threads": args.threads, "context": args.context},
    }
    settings = load_settings(args.config, overrides, require_file=False)
    _configure_logging(settings.log_level)
    from .server import serve  # deferred: imports waitress and the native library

    return serve(settings)


def _config_check(args: argparse.Namespace) -> int:
    settings = validate(read_config_file(args.path), str(args.path))
    print(f"{args.path}: ok (model {settings.model.path}, "
          f"listening on {settings.server.host}:{settings.server.port})")
    return ExitCode.OK


def summarize_health(body: dict[str, Any]) -> str:
    parts = [str(body.get("status", "unknown"))]
    model = body.get("model") or {}
    if model:
        parts.append(f"model={model.get('id')} ({model.get('quantization')}, "
                     f"sha256 {str(model.get('sha256', ''))[:12]}…)")
    verification = body.get("verification") or {}
    if verification:
        parts.append(f"verification={verification.get('result', '?')}")
    board = body.get("board") or {}
    if "soc_temperature_celsius" in board:
        parts.append(f"soc={board['soc_temperature_celsius']:.1f}°C")
    if body.get("error"):
        parts.append(f"error={body['error']}")
    detail = (body.get("engine") or {}).get("detail")
    if body.get("status") != "ok" and detail:
        parts.append(f"({detail})")
    return " ".join(parts)


def _health(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as reply:  # noqa: S310
            body = json.load(reply)
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON body
        try:
            body = json.load(exc)
        except ValueError:
            print(f"unreachable: {args.url} answered HTTP {exc.code} without a health body")
            return ExitCode.UNREACHABLE
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unreachable: {args.url}: {getattr(exc, 'reason', exc)}")
        return ExitCode.UNREACHABLE
    print(summarize_health(body))
    return ExitCode.OK if body.get("status") == "ok" else ExitCode.NOT_OK


def _hw(args: argparse.Namespace) -> int:
    from .detect import detect, format_report
    from .profiles import match

    directories = {"state": args.state_dir, "models": args.model_dir}
    report = detect(args.root, directories)
    report["profile"] = match(report).key
    print(json.dumps(report, indent=2) if args.json else
          f"{format_report(report)}\nprofile  {report['profile']}")
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API service")
    serve.add_argument("--config", type=Path, default=None,
                       help=f"TOML file (default: $PI_APPLIANCE_CONFIG or {DEFAULT_CONFIG_PATH})")
    serve.add_argument("--model", type=Path, help="GGUF model file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    serve.add_argument("--context", type=int, help="context size in tokens (default 4096)")
    serve.add_argument("--api-key-file", type=Path, help="file holding the bearer API key")
    serve.set_defaults(handler=_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a file; start nothing")
    check.add_argument("path", type=Path)
    check.set_defaults(handler=_config_check)

    health = commands.add_parser("health", help="one-line health summary; exit 0 only if ok")
    health.add_argument("--url", default=DEFAULT_HEALTH_URL)
    health.add_argument("--timeout", type=float, default=10.0)
    health.set_defaults(handler=_health)

    hw = commands.add_parser("hw", help="what this machine offers a model: RAM, CPU, storage")
    hw.add_argument("--json", action="store_true")
    hw.add_argument("--state-dir", type=Path, default=Path("/var/lib/pi-llm-appliance"))
    hw.add_argument("--model-dir", type=Path, default=Path("/var/lib/pi-llm-appliance/models"))
    hw.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    hw.set_defaults(handler=_hw)

    from . import benchcmd, modelcmd, plancmd

    benchcmd.add_commands(commands)
    modelcmd.add_commands(commands)
    plancmd.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ApplianceError as exc:
        print(f"pi-appliance: {exc}", file=sys.stderr)
        return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())

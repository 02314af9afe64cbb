"""`pi-appliance serve`, `config check|show` and `health`: run the service, check its
configuration, and ask a running one how it is."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from appliance.cli.options import add_config, add_json
from appliance.exitcodes import ConfigError, ExitCode
from appliance.models.gguf import read_gguf_header
from appliance.settings import (
    ModelSettings,
    ServerSettings,
    Settings,
    configured_settings,
    load_settings,
    read_api_key,
    read_settings,
)
from appliance.util import fetch_health


def _configure_logging(level: str) -> None:
    # Under systemd the journal stamps time and unit itself.
    fmt = ("%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def check_startable(settings: Settings, *, model_file: bool = True) -> None:
    """What `serve` refuses before it starts, raised as the error it exits with: a key file that
    is unreadable or not private (78), a model file that is missing or cannot be read (66) or is
    no GGUF (65). `config check` runs the same, so that a file it passes, `serve` starts with."""
    if settings.server.api_key_file is not None:
        read_api_key(settings.server.api_key_file)
    if model_file:
        read_gguf_header(settings.model.path)


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "server": {"host": args.host, "port": args.port, "api_key_file": args.api_key_file},
        "model": {"path": args.model, "threads": args.threads, "context": args.context},
    }
    settings = load_settings(args.config, overrides, require_file=False)
    check_startable(settings)
    _configure_logging(settings.log_level)
    from appliance.service.server import serve  # deferred: waitress and the native library

    if settings.verify.enabled and settings.verify.by == "service":
        from appliance.verification.verify import verify

        return serve(settings, when_loaded=lambda: verify(settings))
    return serve(settings)


def _config_check(args: argparse.Namespace) -> int:
    settings = read_settings(args.path)
    check_startable(settings, model_file=not args.without_model)
    print(f"{args.path}: ok (model {settings.model.path}"
          f"{' not checked' if args.without_model else ''}, "
          f"listening on {settings.server.host}:{settings.server.port})")
    return ExitCode.OK


def _config_show(args: argparse.Namespace) -> int:
    settings = read_settings(args.path)
    shown = settings.model_dump(mode="json") | {"local_url": settings.server.local_url}
    print(json.dumps(shown, indent=2))
    return ExitCode.OK


def summarize_health(body: dict[str, Any]) -> str:
    parts = [str(body.get("status", "unknown"))]
    model = body.get("model") or {}
    if model:
        parts.append(f"model={model.get('id')} ({model.get('quantization')}, "
                     f"sha256 {str(model.get('sha256', ''))[:12]}…)")
    verification = body.get("verification") or {}
    if verification:
        measured = [verification] + ([verification["conversation"]]
                                     if verification.get("conversation") else [])
        rates = ", ".join(f"{one['measured_tps']:.2f} tok/s at depth {one['depth']}"
                          for one in measured if one.get("measured_tps") is not None)
        parts.append(f"verification={verification.get('result', '?')}"
                     + (f" ({rates})" if rates else ""))
    board = body.get("board") or {}
    if "soc_temperature_celsius" in board:
        parts.append(f"soc={board['soc_temperature_celsius']:.1f}°C")
    if body.get("error"):
        parts.append(f"error={body['error']}")
    detail = (body.get("engine") or {}).get("detail")
    if body.get("status") != "ok" and detail:
        parts.append(f"({detail})")
    return " ".join(parts)


def _key(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.server.api_key_file is None:
        print("no API key is set (server.api_key_file): the API answers without one, which it "
              "does on loopback only", file=sys.stderr)
        return ExitCode.NOT_OK
    print(read_api_key(settings.server.api_key_file).decode())
    return ExitCode.OK


def _service_url(args: argparse.Namespace) -> str:
    """--url, else where the configuration says the service listens, else the default address."""
    if args.url:
        return args.url.removesuffix("/health")
    try:
        settings = configured_settings(args.config)
    except ConfigError as error:
        raise ConfigError(f"{error}; it says where the service listens: run this as root or "
                          "as the service's user, or give --url") from None
    return (settings.server if settings else ServerSettings()).local_url


def _health(args: argparse.Namespace) -> int:
    url = _service_url(args)
    try:
        body = fetch_health(url, args.timeout)
        if not isinstance(body, dict) or "status" not in body:
            raise ValueError(body)
    except OSError as exc:  # nothing answers
        code, body = ExitCode.UNREACHABLE, {"status": "unreachable",
                                            "reason": f"{url}: {getattr(exc, 'reason', exc)}"}
    except ValueError:  # something answers, but it is not the service
        code, body = ExitCode.UNREACHABLE, {"status": "unexpected",
                                            "reason": f"{url} answered without a health body"}
    else:
        code = ExitCode.OK if body["status"] == "ok" else ExitCode.NOT_OK
    if args.json:
        print(json.dumps(body, indent=2))
    elif code == ExitCode.UNREACHABLE:
        print(f"{body['status']}: {body['reason']}")
    else:
        print(summarize_health(body))
    return code


def setting_help(section: type[BaseModel], name: str) -> str:
    """An option's help: the setting's own description and default (settings.py is the source)."""
    field = section.model_fields[name]
    text = str(field.description).replace("**", "").replace("`", "")
    if not field.is_required() and field.default is not None and field.default_factory is None:
        text += f" (default {field.default})"
    return text.replace("%", "%%")


def _absolute_path(text: str) -> Path:
    # A path typed on the command line means what the shell's directory makes of it; the
    # settings take absolute paths only.
    return Path(os.path.abspath(text))


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the API service")
    add_config(serve)
    for flag, section, name, kind in (
            ("--model", ModelSettings, "path", _absolute_path),
            ("--host", ServerSettings, "host", str),
            ("--port", ServerSettings, "port", int), ("--threads", ModelSettings, "threads", int),
            ("--context", ModelSettings, "context", int),
            ("--api-key-file", ServerSettings, "api_key_file", _absolute_path)):
        serve.add_argument(flag, type=kind, help=setting_help(section, name))
    serve.set_defaults(handler=_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            parser_class=type(config))
    check = config_commands.add_parser(
        "check", help="validate a file and make the checks `serve` makes before it starts (the "
        "key file, the model file's header); start nothing")
    check.add_argument("path", type=Path)
    check.add_argument("--without-model", action="store_true", help="leave the model file "
                       "out: for a configuration written before its model is installed (as "
                       "provisioning does)")
    check.set_defaults(handler=_config_check)
    show = config_commands.add_parser(
        "show", help="the validated settings as JSON, every default filled in, and the URL the "
        "device reaches the service at")
    show.add_argument("path", type=Path)
    show.set_defaults(handler=_config_show)

    key = commands.add_parser("key", help="print the API key clients send (as root or the "
                              "service's user: the file is theirs alone)")
    add_config(key)
    key.set_defaults(handler=_key)

    health = commands.add_parser(
        "health", help="one-line health summary; exit 0 only if ok, 69 if unreachable")
    add_config(health)
    health.add_argument("--url", help="the service, e.g. http://127.0.0.1:8080 (default: where "
                        "the configuration says it listens)")
    health.add_argument("--timeout", type=float, default=10.0)
    add_json(health)
    health.set_defaults(handler=_health)


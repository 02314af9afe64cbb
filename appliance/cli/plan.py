"""`pi-appliance plan`: the model this device should run, and why no other was chosen."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from appliance.cli.options import add_config, add_hardware_root, add_json
from appliance.exitcodes import ApplianceError, ExitCode
from appliance.hardware.detect import detect
from appliance.hardware.profiles import load_profiles
from appliance.models.catalog import KV_ELEMENT_BYTES, get_variant, load_catalog
from appliance.planning.planner import (
    PlanRequest,
    calibrate,
    device_from_detection,
    device_from_profile,
    learn_from_verification,
    plan,
)
from appliance.planning.report import (
    calibration_as_dict,
    draw,
    format_calibration,
    format_plan,
    plan_as_dict,
)
from appliance.settings import (
    ModelSettings,
    PathSettings,
    Settings,
    VerifySettings,
    configured_settings,
)
from appliance.util import read_state_file


def _planning_inputs(args: argparse.Namespace) -> tuple[argparse.Namespace, Settings | None]:
    """What the plan is for: the options given, else the appliance's configuration (the context
    and KV cache it serves, the depths and target its verification uses, its directories), else
    the defaults."""
    settings = configured_settings(args.config)
    if settings:
        model, verify, paths = settings.model, settings.verify, settings.paths
    else:
        model, verify, paths = None, VerifySettings(), PathSettings()
    given = vars(args)
    model_default = partial(getattr, model) if model else (
        lambda name: ModelSettings.model_fields[name].default)
    defaults = {"context": model_default("context"), "kv_type": model_default("kv_cache_type"),
                "depth": verify.depth, "conversation_depth": verify.conversation_depth,
                "target_tps": verify.target_tps, "tolerance": verify.tolerance,
                "state_dir": paths.state_dir, "models_dir": paths.models_dir}
    return argparse.Namespace(**given | {name: default if given[name] is None else given[name]
                                         for name, default in defaults.items()}), settings


def _run(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    profiles = load_profiles()
    calibration = calibrate(catalog, profiles)
    if args.calibration:
        print(json.dumps(calibration_as_dict(calibration), indent=2) if args.json
              else format_calibration(calibration))
        return ExitCode.OK
    args, settings = _planning_inputs(args)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else None
    if args.device == "detect":
        report = detect(args.root, {"state": args.state_dir, "models": args.models_dir})
        device = device_from_detection(report, args.state_dir, bandwidth)
        if bandwidth is None and settings:  # what this device measured outranks its profile
            device = learn_from_verification(
                device, read_state_file(settings.verify_state_file), catalog, calibration,
                args.kv_type)
    elif args.device in profiles:
        device = device_from_profile(profiles[args.device], bandwidth)
    else:
        raise ApplianceError(f"--device {args.device!r}: not a profile; choose detect or one of "
                             f"{', '.join(profiles)}", ExitCode.USAGE)
    request = PlanRequest(context=args.context, depth=args.depth,
                          conversation_depth=args.conversation_depth, kv_type=args.kv_type,
                          target_tps=args.target_tps, tolerance=args.tolerance)
    if args.model:
        catalog = {args.model: get_variant(args.model, catalog)}
    result = plan(device, request, catalog, calibration)
    if args.plot:
        draw(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    print(json.dumps(plan_as_dict(result), indent=2) if args.json else format_plan(result))
    return ExitCode.OK if result.choice and result.choice.meets_target else ExitCode.NOT_OK


def _bounded_as(section: type[BaseModel], name: str) -> Callable[[str], Any]:
    """An option held to the bounds of the setting it stands for (verify.tolerance, ...)."""
    field = section.model_fields[name]
    adapter = TypeAdapter(Annotated[field.annotation, *field.metadata])

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error.errors()[0]['msg']}") from None
    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number")
    return value


def add_commands(commands: Any) -> None:
    from_config = "default: the configuration's, else"
    parser = commands.add_parser(
        "plan", help="choose the model for this device (fit first, then speed, then quality)")
    parser.add_argument("--device", default="detect",
                        help="a profile name (e.g. raspberry-pi-5-16gb) or detect (default)")
    add_config(parser)
    parser.add_argument("--context", type=_bounded_as(ModelSettings, "context"),
                        help=f"context window to budget the KV cache for ({from_config} "
                             f"{ModelSettings.model_fields['context'].default})")
    parser.add_argument("--depth", type=_bounded_as(VerifySettings, "depth"),
                        help=f"tokens already in context when speed is predicted ({from_config} "
                             f"{VerifySettings().depth}, as verification measures it)")
    parser.add_argument("--conversation-depth",
                        type=_bounded_as(VerifySettings, "conversation_depth"),
                        help="a second depth to predict at, shown and not gated "
                             f"({from_config} {VerifySettings().conversation_depth})")
    parser.add_argument("--kv-type", choices=sorted(KV_ELEMENT_BYTES),
                        help=f"KV cache type ({from_config} "
                             f"{ModelSettings.model_fields['kv_cache_type'].default})")
    parser.add_argument("--target-tps", type=_positive,
                        help=f"decode tokens/s to reach ({from_config} "
                             f"{VerifySettings().target_tps:g})")
    parser.add_argument("--tolerance", type=_bounded_as(VerifySettings, "tolerance"),
                        help="pass at target × (1 − tolerance), as verification does "
                             f"({from_config} {VerifySettings().tolerance})")
    parser.add_argument("--model", help="predict and check one catalog variant only")
    parser.add_argument("--bandwidth", type=_positive,
                        help="effective memory bandwidth in GB/s (overrides measured/profile)")
    add_json(parser)
    parser.add_argument("--plot", type=Path, help="draw the candidates to a PNG file")
    parser.add_argument("--calibration", action="store_true",
                        help="show the bandwidth model's fit against published measurements")
    for option in ("--state-dir", "--models-dir"):
        parser.add_argument(option, type=Path, default=None,
                            help=f"{from_config} the layout's")
    add_hardware_root(parser)
    parser.set_defaults(handler=_run)

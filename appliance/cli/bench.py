"""The `bench` and `verify` commands of `pi-appliance`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.cli.options import add_config, add_json, add_state_dir
from appliance.exitcodes import ApplianceError, ExitCode
from appliance.hardware.bandwidth import load_bandwidth, measure_read_bandwidth, save_bandwidth
from appliance.hardware.sysfs import physical_core_count
from appliance.models.checksums import file_sha256
from appliance.models.gguf import quantization_name
from appliance.service import tuning
from appliance.settings import load_settings, read_api_key
from appliance.util import fetch_health
from appliance.verification import roofline
from appliance.verification.bench import (
    BenchSpec,
    Endpoint,
    InProcess,
    ThroughService,
    bench,
    format_table,
)
from appliance.verification.verify import EXIT_CODES, verify


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _depths(text: str) -> list[int]:
    try:
        depths = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give depths as numbers, e.g. 0,1024") from None
    if depths[0] < 0:
        raise argparse.ArgumentTypeError("a depth cannot be negative")
    return depths


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a thread count ≥ 1, or auto")
    return int(text)


def _bandwidth(args: argparse.Namespace) -> dict[str, Any] | None:
    """The measured bandwidth: measured now with --bandwidth (and stored), else the stored one."""
    if args.bandwidth:
        threads = physical_core_count()
        _progress(f"measuring memory read bandwidth with {threads} threads")
        measured = measure_read_bandwidth(threads)
        try:
            return save_bandwidth(args.state_dir, measured, threads)
        except OSError as error:
            _progress(f"not stored ({error}); figure: {measured / 1e9:.2f} GB/s")
            return {"read_bytes_per_second": measured, "threads": threads}
    return load_bandwidth(args.state_dir)


def _in_process(args: argparse.Namespace, spec: BenchSpec) -> dict[str, Any]:
    model: Path = args.model
    if not model.is_file():
        raise ApplianceError(f"{model}: no such model file", ExitCode.MODEL_MISSING)
    sweep = None
    auto = args.threads == "auto"
    cores = physical_core_count()
    runner = InProcess(model, cores if auto else args.threads, spec)
    threads = args.threads
    if auto:  # timed as the service times it, on this one loaded model
        rates = tuning.decode_rates(runner.llama, list(range(1, cores + 1)), progress=_progress)
        threads = tuning.fastest(rates)
        tuning.use_threads(runner.llama, threads)
        sweep = {"tg_tokens_per_second": rates, "fastest": threads}
    report = bench(runner, spec, _progress)
    metadata = runner.metadata()
    file_type = metadata.get("general.file_type")
    size = model.stat().st_size
    report |= {
        "mode": "in-process", "threads": threads, "threads_sweep": sweep,
        "system_info": runner.system_info,
        "model": {"path": str(model), "id": metadata.get("general.name") or model.stem,
                  "sha256": file_sha256(model, args.state_dir if args.state_dir.is_dir() else None),
                  "quantization": quantization_name(int(file_type) if file_type else None),
                  "size_bytes": size},
    }
    return report | {"_metadata": metadata, "_weight_bytes": size}


def _through_service(args: argparse.Namespace, spec: BenchSpec) -> dict[str, Any]:
    url = args.url.rstrip("/")
    try:
        health = fetch_health(url)
    except (OSError, ValueError) as error:
        raise ApplianceError(f"{url}: no health answer ({error})", ExitCode.UNREACHABLE) from None
    model = health.get("model") or {}
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    report = bench(ThroughService(Endpoint(url, api_key), spec), spec, _progress)
    return report | {"mode": f"service {url}", "threads": model.get("threads"),
                     "system_info": model.get("system_info"), "model": model}


def run_bench(args: argparse.Namespace) -> int:
    spec = BenchSpec(depths=args.depth, n_prompt=args.n_prompt, n_gen=args.n_gen,
                     repetitions=args.repetitions, warmup=not args.no_warmup)
    bandwidth = _bandwidth(args)
    if args.model is None and args.url is None:
        if bandwidth is None:
            raise ApplianceError("give --model PATH, --url URL or --bandwidth", ExitCode.USAGE)
        print(json.dumps(bandwidth, indent=2) if args.json else
              f"memory read bandwidth: {bandwidth['read_bytes_per_second'] / 1e9:.2f} GB/s "
              f"({bandwidth['threads']} threads)")
        return ExitCode.OK
    report = _in_process(args, spec) if args.model else _through_service(args, spec)
    metadata = report.pop("_metadata", None)
    weight_bytes = report.pop("_weight_bytes", None)
    if bandwidth and metadata and weight_bytes:
        deepest = report["results"][-1]
        ceiling = roofline.ceiling(bandwidth["read_bytes_per_second"], weight_bytes, metadata,
                                   deepest["depth"])
        if ceiling:
            ceiling["fraction"] = (deepest["tg_tokens_per_second"]["median"]
                                   / ceiling["ceiling_tokens_per_second"])
            report["roofline"] = ceiling
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return ExitCode.OK if report["conditions"]["valid"] else ExitCode.NOT_OK


def run_verify(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, {}, require_file=True)
    result = verify(settings, progress=_progress)
    if result is None:
        return ExitCode.OK
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['result']}: {result['reason']}")
    return EXIT_CODES[result["result"]]


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """What is measured; `fleet bench` takes the same and passes them on (`spec_arguments`)."""
    parser.add_argument("--depth", type=_depths, default=[0, 1024],
                        help="context depths, comma-separated (default 0,1024)")
    parser.add_argument("--n-prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--n-gen", type=int, default=64, help="generated tokens (default 64)")
    parser.add_argument("--repetitions", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass")


def spec_arguments(args: argparse.Namespace) -> list[str]:
    """The command line that `add_spec_arguments` parsed into `args`."""
    return (["--depth", ",".join(map(str, args.depth)), "--n-prompt", str(args.n_prompt),
             "--n-gen", str(args.n_gen), "--repetitions", str(args.repetitions)]
            + (["--no-warmup"] if args.no_warmup else []))


def add_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "bench", help="measure prompt and generation speed (in-process or through a service)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="GGUF file, measured in this process")
    source.add_argument("--url", help="a running service, measured through its API (streaming)")
    parser.add_argument("--api-key-file", type=Path, help="bearer key for --url")
    add_spec_arguments(parser)
    parser.add_argument("--threads", type=_threads, default=physical_core_count(),
                        help="threads for --model, or auto: sweep 1…cores, keep the fastest")
    parser.add_argument("--bandwidth", action="store_true",
                        help="measure memory read bandwidth (stored for the roofline/planner)")
    add_state_dir(parser)
    add_json(parser)
    parser.set_defaults(handler=run_bench)

    check = commands.add_parser(
        "verify", help="measure the running service against verify.target_tps; record the verdict")
    add_config(check)
    add_json(check)
    check.set_defaults(handler=run_verify)

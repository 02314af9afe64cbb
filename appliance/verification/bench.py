"""`pi-appliance bench`: prompt processing (pp) and generation (tg) rates, measured as llama-bench
measures them, either in-process on a model file or through a running service.

In-process, the KV cache is filled to the chosen depth before each timed pass, so "tg at depth
1024" is the speed of generating the 1025th token onward, as in a real conversation. Through a
service (streaming, as users see it), a request's prompt is the context: depth 0 means a prompt of
`n_prompt` tokens, depth D one of D + `n_prompt`. Each pass starts with a different prompt so
that no server can answer from its prompt cache. A warm-up pass precedes the timed ones.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.util import now_iso
from appliance.verification.conditions import Monitor, machine_facts

Progress = Callable[[str], None]

# Plain words the common tokenizers map to about one token each; a pass's prompt cycles them.
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
          "small", "birds", "sing", "in", "the", "old", "green", "tree", "near", "our", "house",
          "and", "every", "morning", "we", "walk", "to", "town", "for", "bread")


@dataclass
class BenchSpec:
    depths: list[int] = field(default_factory=lambda: [0, 1024])
    n_prompt: int = 128
    n_gen: int = 64
    repetitions: int = 5
    warmup: bool = True


def spread(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "samples": [round(value, 4) for value in values],
    }


@dataclass
class Pass:
    """One timed pass at one depth."""

    depth: int
    prompt_tokens: int
    prompt_seconds: float
    generated_tokens: int
    generation_seconds: float
    first_token_seconds: float

    @property
    def pp_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds

    @property
    def tg_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds


def summarize(passes: list[Pass]) -> list[dict[str, Any]]:
    by_depth: dict[int, list[Pass]] = {}
    for one in passes:
        by_depth.setdefault(one.depth, []).append(one)
    return [
        {
            "depth": depth,
            "n_prompt": round(statistics.median(p.prompt_tokens for p in group)),
            "n_gen": round(statistics.median(p.generated_tokens for p in group)),
            "pp_tokens_per_second": spread([p.pp_tps for p in group]),
            "tg_tokens_per_second": spread([p.tg_tps for p in group]),
            "time_to_first_token_ms": spread([p.first_token_seconds * 1000 for p in group]),
        }
        for depth, group in sorted(by_depth.items())
    ]


# In-process -----------------------------------------------------------------------------------
class InProcess:
    """Measures a model file with llama-cpp-python directly: the ceiling the service can reach."""

    def __init__(self, model_path: Path, threads: int, spec: BenchSpec):
        from llama_cpp import Llama, llama_cpp  # deferred: importing loads the native library

        self.spec = spec
        self.threads = threads
        self.llama = Llama(
            model_path=str(model_path), n_threads=threads, n_threads_batch=threads,
            n_ctx=max(spec.depths) + spec.n_prompt + spec.n_gen + 8, n_batch=512,
            use_mmap=True, verbose=False,
        )
        self.system_info = llama_cpp.llama_print_system_info().decode().strip()
        self._random = random.Random(0)  # noqa: S311 - reproducible tokens, not secrets
        # Ordinary tokens only: skip the first 256 ids (control and byte tokens in most vocabs).
        self._vocab = range(256, self.llama.n_vocab())

    def _tokens(self, count: int) -> list[int]:
        return [self._random.choice(self._vocab) for _ in range(count)]

    def one_pass(self, depth: int) -> Pass:
        llama, spec = self.llama, self.spec
        llama.reset()
        if depth:
            llama.eval(self._tokens(depth))  # the conversation so far (not timed)
        started = time.perf_counter()
        llama.eval(self._tokens(spec.n_prompt))
        prompt_seconds = time.perf_counter() - started
        llama.n_tokens = depth  # generation continues the conversation, not this prompt
        started = time.perf_counter()
        for token in self._tokens(spec.n_gen):
            llama.eval([token])
        generation_seconds = time.perf_counter() - started
        return Pass(depth, spec.n_prompt, prompt_seconds, spec.n_gen, generation_seconds,
                    first_token_seconds=prompt_seconds)

    def metadata(self) -> dict[str, str]:
        return dict(self.llama.metadata)


# Through a service ----------------------------------------------------------------------------
@dataclass
class Endpoint:
    """An OpenAI-compatible server's /v1/completions, streaming."""

    url: str
    api_key: bytes | None = None  # as read_api_key() returns it
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=lambda: {"ignore_eos": True})
    timeout: float = 600.0

    def stream_completion(self, prompt: str, max_tokens: int) -> tuple[Pass, dict[str, Any]]:
        """Send one streamed completion; time its first and last token; return the pass and
        the usage the server reported."""
        parts = urllib.parse.urlsplit(self.url)
        connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                            else http.client.HTTPConnection)
        connection = connection_class(parts.hostname or "127.0.0.1", parts.port,
                                      timeout=self.timeout)
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra_body}
        headers = {"Content-Type": "application/json", **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key.decode()}"
        try:
            started = time.perf_counter()
            connection.request("POST", parts.path.rstrip("/") + "/v1/completions",
                               json.dumps(body), headers)
            response = connection.getresponse()
            if response.status != 200:
                raise ApplianceError(
                    f"{self.url}: HTTP {response.status}: {response.read()[:300]!r}",
                    ExitCode.UNREACHABLE)
            first = last = None
            chunks = 0
            usage: dict[str, Any] = {}
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    usage = event["usage"]
                if any(choice.get("text") for choice in event.get("choices") or []):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
        except OSError as error:
            raise ApplianceError(f"{self.url}: {error}", ExitCode.UNREACHABLE) from error
        finally:
            connection.close()
        if first is None or last is None:
            raise ApplianceError(f"{self.url}: the stream carried no tokens", ExitCode.NOT_OK)
        generated = int(usage.get("completion_tokens") or chunks)
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        return Pass(
            depth=0, prompt_tokens=prompt_tokens, prompt_seconds=first - started,
            # The first token's time belongs to the prompt; the rest is generation.
            generated_tokens=max(generated - 1, 1), generation_seconds=max(last - first, 1e-9),
            first_token_seconds=first - started,
        ), usage


class ThroughService:
    def __init__(self, endpoint: Endpoint, spec: BenchSpec):
        self.endpoint = endpoint
        self.spec = spec
        self._words_per_token = 1.0  # calibrated from the server's own token counts
        self._counter = 0

    def _prompt(self, tokens: int) -> str:
        self._counter += 1
        words = max(1, round(tokens * self._words_per_token))
        # A distinct opening per pass defeats prompt caching.
        body = " ".join(_WORDS[i % len(_WORDS)] for i in range(words))
        return f"Pass {self._counter} at {time.time_ns()}: {body}"

    def one_pass(self, depth: int) -> Pass:
        target = depth + self.spec.n_prompt
        measured, _usage = self.endpoint.stream_completion(self._prompt(target), self.spec.n_gen)
        if measured.prompt_tokens:
            self._words_per_token *= target / measured.prompt_tokens
        measured.depth = depth
        return measured


def run_passes(runner: InProcess | ThroughService, spec: BenchSpec,
               progress: Progress) -> list[Pass]:
    passes = []
    if spec.warmup:  # once: the weights are paged in and the caches warm for every depth after
        runner.one_pass(spec.depths[0])
    for depth in spec.depths:
        for repetition in range(spec.repetitions):
            one = runner.one_pass(depth)
            passes.append(one)
            progress(f"depth {depth}: pass {repetition + 1}/{spec.repetitions}: "
                     f"pp {one.pp_tps:.1f} tok/s, tg {one.tg_tps:.2f} tok/s")
    return passes


def bench(runner: InProcess | ThroughService, spec: BenchSpec, progress: Progress,
          hardware_root: Path = Path("/")) -> dict[str, Any]:
    """Measure, with the machine's facts and the conditions the measurement ran under."""
    started_at = now_iso()
    with Monitor(hardware_root) as monitor:
        passes = run_passes(runner, spec, progress)
    conditions = monitor.conditions
    results = summarize(passes)
    report: dict[str, Any] = {
        "started_at": started_at,
        "finished_at": now_iso(),
        "spec": {"depths": spec.depths, "n_prompt": spec.n_prompt, "n_gen": spec.n_gen,
                 "repetitions": spec.repetitions, "warmup": spec.warmup},
        "machine": machine_facts(hardware_root),
        "conditions": conditions.as_dict(),
        "results": results,
    }
    if conditions.power_watts:
        for row in results:
            row["tokens_per_joule"] = (row["tg_tokens_per_second"]["median"]
                                       / conditions.power_watts)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a table a person reads at a glance."""
    lines = []
    source = report.get("model", {})
    lines.append(f"model   {source.get('id') or source.get('path')} "
                 f"({source.get('quantization')}, {source.get('size_bytes', 0) / 1e6:.0f} MB)")
    lines.append(f"mode    {report['mode']}, threads {report.get('threads')}, "
                 f"{report['machine']['cpu_model']}")
    if report.get("system_info"):
        lines.append(f"build   {report['system_info']}")
    lines.append("")
    lines.append(f"{'depth':>6} {'pp tok/s':>16} {'tg tok/s':>16} {'TTFT ms':>12}")
    for row in report["results"]:
        pp, tg, ttft = (row["pp_tokens_per_second"], row["tg_tokens_per_second"],
                        row["time_to_first_token_ms"])
        lines.append(f"{row['depth']:>6} {pp['median']:>9.1f} ± {pp['stdev']:<5.1f}"
                     f"{tg['median']:>9.2f} ± {tg['stdev']:<5.2f}{ttft['median']:>10.0f}")
    conditions = report["conditions"]
    if not conditions["valid"]:
        lines.append(f"INVALID: {conditions['invalid_reason']}")
    if report.get("roofline"):
        roof = report["roofline"]
        lines.append(f"roofline {roof['ceiling_tokens_per_second']:.1f} tok/s at "
                     f"{roof['bandwidth_gb_per_second']:.1f} GB/s; measured tg is "
                     f"{roof['fraction']:.0%} of it")
    return "\n".join(lines)

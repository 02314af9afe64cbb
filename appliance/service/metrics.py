"""Prometheus metrics, all prefixed `appliance_`, in a registry owned by one app.

Names follow Prometheus' conventions (`promtool check metrics` holds them to it in the tests):
base units, `_total` counters, `_info` for labels to join on, timestamps rather than ages, so a
stale value is visible as one. Throughput across a fleet is a ratio of counters, e.g.
`rate(appliance_generated_tokens_total[5m]) / rate(appliance_generation_seconds_total[5m])`,
which weighs every token alike (a histogram of per-request rates would weigh a 5-token reply
like a 1,000-token one).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.hardware import sysfs
from appliance.util import filesystem_space, read_state_file

if TYPE_CHECKING:
    from appliance.service.engine import Engine

# A `_created` series per counter and histogram doubles what is scraped and stored for a
# timestamp nobody graphs (Prometheus' own guidance for client libraries).
prometheus_client.disable_created_metrics()

# text/plain 0.0.4: what every Prometheus 2 and 3 parses. Flask's `mimetype=` would append a
# second charset, which Prometheus 2 logs on every scrape and Prometheus 3 refuses.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _LiveCollector(Collector):
    """Values read at scrape time, so they are never stale: engine state and the board."""

    def __init__(self, engine: Engine, hardware_root: Path, verify_state_file: Path,
                 models_dir: Path, status: Callable[[dict | None], str],
                 statuses: tuple[str, ...]):
        self._engine = engine
        self._root = hardware_root
        self._models_dir = models_dir
        self._verify_state_file = verify_state_file
        self._status = status
        self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        build = GaugeMetricFamily("appliance_build_info", "The appliance's version",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        # Read once a scrape: the status and the verification series agree.
        verification = read_state_file(self._verify_state_file)
        current = self._status(verification)
        status = GaugeMetricFamily(
            "appliance_status", "The status /health reports (1 = current): ok and degraded "
            "serve, the others do not", labels=["status"])
        for name in self._statuses:
            status.add_metric([name], int(name == current))
        yield status
        yield _gauge("appliance_queue_depth", "Requests waiting for the model", engine.queue_depth)
        yield _gauge("appliance_requests_in_progress", "Generations running now (0 or 1)",
                     int(engine.busy))
        if engine.busy:
            yield _gauge("appliance_engine_last_progress_timestamp_seconds",
                         "When the running request last made progress (absent while idle)",
                         time.time() - engine.heartbeat_age())
        yield _gauge("appliance_engine_stall_seconds",
                     "Seconds without progress after which health says stalled",
                     engine.stall_limit())
        progress = engine.prompt_progress
        evaluation = GaugeMetricFamily(
            "appliance_prompt_evaluation_tokens",
            "The prompt evaluation running now: tokens evaluated and in all (0 when none runs)",
            labels=["of"])
        evaluation.add_metric(["evaluated"], progress.evaluated if progress else 0)
        evaluation.add_metric(["total"], progress.total if progress else 0)
        yield evaluation
        yield CounterMetricFamily(
            "appliance_prompt_tokens_evaluated",
            "Prompt tokens llama.cpp evaluated; fewer than prompt_tokens when a conversation's "
            "start was still in the KV cache", value=engine.prompt_tokens_evaluated)
        yield CounterMetricFamily(
            "appliance_prompt_evaluation_seconds",
            "Seconds spent evaluating those tokens: prompt speed is the ratio of the rates",
            value=engine.prompt_evaluation_seconds)
        if engine.prompt_tokens_per_second is not None:
            yield _gauge("appliance_prompt_evaluation_tokens_per_second",
                         "Prompt evaluation speed measured (moving average)",
                         engine.prompt_tokens_per_second)
        state = GaugeMetricFamily("appliance_engine_state", "Engine state (1 = current)",
                                  labels=["state"])
        for engine_state in type(engine.state):
            state.add_metric([engine_state.value], int(engine.state is engine_state))
        yield state
        if engine.facts is not None:
            facts = engine.facts
            model = GaugeMetricFamily(
                "appliance_model_info", "The loaded model", labels=["model", "sha256",
                                                                    "quantization"])
            model.add_metric([facts.id, facts.sha256, facts.quantization or ""], 1)
            yield model
            yield _gauge("appliance_model_load_seconds",
                         "Seconds the model took to check and load", facts.load_seconds)
            yield _gauge("appliance_model_size_bytes", "Size of the loaded model file",
                         facts.size_bytes)
            context = GaugeMetricFamily(
                "appliance_context_tokens",
                "The context: its size and the positions the KV cache holds now",
                labels=["of"])
            context.add_metric(["size"], facts.context)
            context.add_metric(["held"], engine.context_tokens_held)
            yield context
        temperature = sysfs.soc_temperature_celsius(self._root)
        if temperature is not None:
            yield _gauge("appliance_soc_temperature_celsius", "SoC temperature", temperature)
        throttle = sysfs.throttle_state(self._root)
        if throttle is not None:
            flags = GaugeMetricFamily("appliance_throttle_flag",
                                      "Raspberry Pi throttle bits (get_throttled)",
                                      labels=["condition", "when"])
            for when, since_boot in (("now", False), ("since_boot", True)):
                for condition, active in throttle.flags(since_boot=since_boot).items():
                    flags.add_metric([condition, when], int(active))
            yield flags
        yield from self._filesystem()
        yield from self._verification(verification)

    def _filesystem(self) -> Iterator[Metric]:
        # The model store's filesystem: a model install needs the model's size free twice over.
        space = filesystem_space(self._models_dir)
        if space is None:
            return
        yield _gauge("appliance_models_filesystem_avail_bytes",
                     "Bytes free to the service on the model store's filesystem", space[0])
        yield _gauge("appliance_models_filesystem_size_bytes",
                     "Size of the model store's filesystem", space[1])

    def _verification(self, result: dict | None) -> Iterator[Metric]:
        if result is None:
            return
        yield _gauge("appliance_verification_passed",
                     "1 if the last speed verification met its target",
                     int(result.get("result") == "pass"))
        if isinstance(result.get("timestamp"), str):
            try:
                finished = calendar.timegm(time.strptime(result["timestamp"],
                                                         "%Y-%m-%dT%H:%M:%SZ"))
            except ValueError:
                pass
            else:
                yield _gauge("appliance_verification_timestamp_seconds",
                             "When the last speed verification finished", finished)
        if result.get("measured_tps") is not None:
            rates = GaugeMetricFamily("appliance_verification_tokens_per_second",
                                      "Decode speed the last verification measured, by context "
                                      "depth (the gated one and the conversation's)",
                                      labels=["depth", "gated"])
            rates.add_metric([str(result["depth"]), "true"], result["measured_tps"])
            if result.get("conversation"):
                conversation = result["conversation"]
                rates.add_metric([str(conversation["depth"]), "false"],
                                 conversation["measured_tps"])
            yield rates
        yield _gauge("appliance_verification_target_tokens_per_second",
                     "Decode speed the verification requires", result.get("target_tps", 0))


class Metrics:
    def __init__(self, engine: Engine, hardware_root: Path, verify_state_file: Path,
                 models_dir: Path, status: Callable[[dict | None], str],
                 statuses: tuple[str, ...]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("appliance_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.request_duration = Histogram(
            "appliance_request_duration_seconds",
            "From a request's arrival to its response's last byte (a stream's end)",
            ["endpoint"], buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.generated_tokens = Counter("appliance_generated_tokens", "Tokens generated",
                                        registry=self.registry)
        self.generation_seconds = Counter(
            "appliance_generation_seconds",
            "Seconds from the end of prompt evaluation to the last token: decode speed is "
            "rate(generated_tokens) / rate(generation_seconds)", registry=self.registry)
        self.generation_rate = Histogram(
            "appliance_generation_tokens_per_second", "Decode speed of each generation",
            buckets=(1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 64, 128, 256, 512),
            registry=self.registry)
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds", "Time from request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry)
        self.constrained_generations = Counter(
            "appliance_constrained_generations",
            "Generations held to a grammar, by what asked for it (json_object, json_schema, "
            "tools)", ["kind"], registry=self.registry)
        self.tool_calls = Counter("appliance_tool_calls", "Tool calls the model answered with",
                                  registry=self.registry)
        self.embedding_tokens = Counter("appliance_embedding_tokens",
                                        "Tokens of the texts /v1/embeddings embedded",
                                        registry=self.registry)
        # Resident memory above all: the model and the KV cache are most of a Pi's RAM.
        ProcessCollector(registry=self.registry)
        self.registry.register(_LiveCollector(engine, hardware_root, verify_state_file,
                                              models_dir, status, statuses))

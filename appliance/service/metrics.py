"""Prometheus metrics, all prefixed `appliance_`, in a registry owned by one app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.hardware import sysfs

if TYPE_CHECKING:
    from appliance.service.engine import Engine


class _LiveCollector(Collector):
    """Values read at scrape time, so they are never stale: engine state and the board."""

    def __init__(self, engine: Engine, hardware_root: Path, verify_state_file: Path):
        self._engine = engine
        self._root = hardware_root
        self._verify_state_file = verify_state_file

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        yield GaugeMetricFamily("appliance_queue_depth", "Requests waiting for the model",
                                value=engine.queue_depth)
        yield GaugeMetricFamily("appliance_requests_in_progress",
                                "Generations running now (0 or 1)", value=int(engine.busy))
        yield GaugeMetricFamily("appliance_engine_heartbeat_age_seconds",
                                "Seconds since the running request last made progress",
                                value=engine.heartbeat_age())
        yield GaugeMetricFamily("appliance_engine_stall_seconds",
                                "Seconds without progress after which health says stalled",
                                value=engine.stall_limit())
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
            "Prompt tokens evaluated; fewer than prompt_tokens when a conversation's start was "
            "still in the KV cache", value=engine.prompt_tokens_evaluated)
        if engine.prompt_tokens_per_second is not None:
            yield GaugeMetricFamily("appliance_prompt_evaluation_tokens_per_second",
                                    "Prompt evaluation speed measured (moving average)",
                                    value=engine.prompt_tokens_per_second)
        ready = GaugeMetricFamily("appliance_engine_state", "Engine state (1 = current)",
                                  labels=["state"])
        for state in type(engine.state):
            ready.add_metric([state.value], int(engine.state is state))
        yield ready
        if engine.facts is not None:
            yield GaugeMetricFamily("appliance_model_load_seconds",
                                    "Seconds the model took to check and load",
                                    value=engine.facts.load_seconds)
        temperature = sysfs.soc_temperature_celsius(self._root)
        if temperature is not None:
            yield GaugeMetricFamily("appliance_soc_temperature_celsius", "SoC temperature",
                                    value=temperature)
        throttle = sysfs.throttle_state(self._root)
        if throttle is not None:
            flags = GaugeMetricFamily("appliance_throttle_flag",
                                      "Raspberry Pi throttle bits (get_throttled)",
                                      labels=["condition", "when"])
            for when, since_boot in (("now", False), ("since_boot", True)):
                for condition, active in throttle.flags(since_boot=since_boot).items():
                    flags.add_metric([condition, when], int(active))
            yield flags
        yield from self._verification()

    def _verification(self) -> Iterator[Metric]:
        try:
            result = json.loads(self._verify_state_file.read_text())
        except (OSError, ValueError):
            return
        yield GaugeMetricFamily("appliance_verification_passed",
                                "1 if the last speed verification met its target",
                                value=int(result.get("result") == "pass"))
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
        yield GaugeMetricFamily("appliance_verification_target_tokens_per_second",
                                "Decode speed the verification requires",
                                value=result.get("target_tps", 0))


class Metrics:
    def __init__(self, engine: Engine, hardware_root: Path, verify_state_file: Path):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("appliance_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("appliance_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.generated_tokens = Counter("appliance_generated_tokens", "Tokens generated",
                                        registry=self.registry)
        self.generation_rate = Histogram(
            "appliance_generation_tokens_per_second", "Decode speed of each generation",
            buckets=(1, 2, 4, 6, 8, 10, 12, 16, 24, 32, 64, 128, 256, 512),
            registry=self.registry)
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds", "Time from request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry)
        self.registry.register(_LiveCollector(engine, hardware_root, verify_state_file))

"""The conditions a benchmark ran under: what the machine is, and what happened to it meanwhile.

A tokens/s figure means nothing without the build, the CPU, the model and the board's state. The
monitor samples temperature, throttle bits and (on a Pi 5, through `vcgencmd pmic_read_adc`)
power while a measurement runs; a run during which a "now" throttle bit was set is invalid.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.hardware import sysfs

SAMPLE_INTERVAL_SECONDS = 1.0
_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=([0-9.]+)[AV]\s*$")


def cpu_model(root: Path = Path("/")) -> str:
    """The CPU as /proc/cpuinfo names it ("model name"), else the board, else the platform."""
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def memory_total_bytes(root: Path = Path("/")) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts(root: Path = Path("/")) -> dict[str, Any]:
    """What the machine is: CPU, cores, RAM, board, and the software versions that measure."""
    return {
        "appliance_version": __version__,
        # Pins the vendored llama.cpp; the system-info line says how it was compiled.
        "llama_cpp_python_version": _installed_version("llama-cpp-python"),
        "cpu_model": cpu_model(root),
        "cpu_count": os.cpu_count(),
        "physical_cores": sysfs.physical_core_count(root),
        "memory_total_bytes": memory_total_bytes(root),
        "board": sysfs.board_model(root),
        "architecture": platform.machine(),
    }


def parse_pmic_adc(text: str) -> float | None:
    """Board power in watts from `vcgencmd pmic_read_adc`: the sum of current x voltage over the
    rails that report both (the Pi 5's PMIC lists each rail's `_A` and `_V` reading)."""
    readings: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _PMIC_LINE.match(line)
        if match:
            rail, unit, value = match.groups()
            readings.setdefault(rail, {})[unit] = float(value)
    products = [rail["A"] * rail["V"] for rail in readings.values() if {"A", "V"} <= rail.keys()]
    return sum(products) if products else None


def read_power_watts() -> float | None:
    """Board power now, where the board exposes it (`vcgencmd` on a Raspberry Pi 5)."""
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd is None:
        return None
    try:
        result = subprocess.run([vcgencmd, "pmic_read_adc"], capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_pmic_adc(result.stdout) if result.returncode == 0 else None


@dataclass
class Conditions:
    """Temperature, throttle bits and power before, during and after a measurement."""

    temperature_before: float | None = None
    temperature_after: float | None = None
    temperature_max: float | None = None
    throttle_before: int | None = None
    throttle_after: int | None = None
    throttle_now_during: int = 0  # OR of the "now" bits over every sample
    power_samples: list[float] = field(default_factory=list)

    @property
    def power_watts(self) -> float | None:
        return sum(self.power_samples) / len(self.power_samples) if self.power_samples else None

    @property
    def invalid_reason(self) -> str | None:
        """Why the figures cannot be trusted: a "now" throttle bit was set while they ran."""
        state = sysfs.ThrottleState(self.throttle_now_during)
        active = [name for name, on in state.flags().items() if on]
        if active:
            return f"the board was {', '.join(active)} during the run; its figures understate it"
        return None

    def as_dict(self) -> dict[str, Any]:
        def hexed(value: int | None) -> str | None:
            return None if value is None else f"0x{value:x}"

        return {
            "soc_temperature_celsius": {"before": self.temperature_before,
                                        "max": self.temperature_max,
                                        "after": self.temperature_after},
            "throttle": {"before": hexed(self.throttle_before),
                         "now_bits_during": hexed(self.throttle_now_during),
                         "after": hexed(self.throttle_after)},
            "power_watts": self.power_watts,
            "valid": self.invalid_reason is None,
            "invalid_reason": self.invalid_reason,
        }


class Monitor:
    """Samples the board in a background thread for as long as the `with` block runs."""

    def __init__(self, root: Path = Path("/"), interval: float = SAMPLE_INTERVAL_SECONDS):
        self.root = root
        self.interval = interval
        self.conditions = Conditions()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def _sample(self) -> None:
        conditions = self.conditions
        temperature = sysfs.soc_temperature_celsius(self.root)
        if temperature is not None:
            conditions.temperature_max = max(temperature, conditions.temperature_max or temperature)
        throttle = sysfs.throttle_state(self.root)
        if throttle is not None:
            conditions.throttle_now_during |= throttle.raw & 0xF
        power = read_power_watts()
        if power is not None:
            conditions.power_samples.append(power)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Monitor:
        throttle = sysfs.throttle_state(self.root)
        self.conditions.throttle_before = throttle.raw if throttle else None
        self.conditions.temperature_before = sysfs.soc_temperature_celsius(self.root)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        throttle = sysfs.throttle_state(self.root)
        self.conditions.throttle_after = throttle.raw if throttle else None
        self.conditions.temperature_after = sysfs.soc_temperature_celsius(self.root)



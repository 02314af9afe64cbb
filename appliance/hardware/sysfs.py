"""Readings of the board the appliance runs on: cores, board model, temperature, throttling.

Every path is taken relative to a root so that tests can present a Raspberry Pi from fixture
files. A value that cannot be read is None: absent, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

THERMAL_ZONE = "sys/class/thermal/thermal_zone0/temp"
# /proc/device-tree links here; ProcSubset=pid hides /proc but not /sys.
DEVICE_TREE_MODELS = ("sys/firmware/devicetree/base/model", "proc/device-tree/model")
# The Raspberry Pi firmware driver exposes vcgencmd's get_throttled value here (hex), so the
# service can read it without /dev/vcio, which PrivateDevices= hides.
THROTTLED_GLOBS = ("sys/devices/platform/soc/soc:firmware/get_throttled",
                   "sys/devices/platform/*/*firmware*/get_throttled",
                   "sys/devices/platform/*/*/*firmware*/get_throttled")

# vcgencmd get_throttled bits: 0-3 are "now", 16-19 the same conditions "since boot".
THROTTLE_FLAGS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
}
SINCE_BOOT_SHIFT = 16


@dataclass(frozen=True)
class ThrottleState:
    raw: int

    def flags(self, *, since_boot: bool = False) -> dict[str, bool]:
        shift = SINCE_BOOT_SHIFT if since_boot else 0
        return {name: bool(self.raw >> (bit + shift) & 1) for bit, name in THROTTLE_FLAGS.items()}

    def as_dict(self) -> dict[str, object]:
        return {"raw": f"0x{self.raw:x}", "now": self.flags(),
                "since_boot": self.flags(since_boot=True)}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def board_model(root: Path = Path("/")) -> str | None:
    for location in DEVICE_TREE_MODELS:
        text = _read_text(root / location)
        if text:
            return text.rstrip("\x00\n ")
    return None


def soc_temperature_celsius(root: Path = Path("/")) -> float | None:
    text = _read_text(root / THERMAL_ZONE)
    try:
        return int(text.strip()) / 1000.0 if text else None
    except ValueError:
        return None


def throttle_state(root: Path = Path("/")) -> ThrottleState | None:
    for pattern in THROTTLED_GLOBS:
        for path in sorted(root.glob(pattern)):
            text = _read_text(path)
            if text is None:
                continue
            try:
                return ThrottleState(int(text.strip(), 16))
            except ValueError:
                continue
    return None


def physical_core_count(root: Path = Path("/")) -> int:
    """Physical cores this process may use: llama.cpp gains nothing from SMT siblings."""
    allowed = os.sched_getaffinity(0)
    cores = set()
    for cpu in allowed:
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        package = _read_text(topology / "physical_package_id")
        core = _read_text(topology / "core_id")
        if package is None or core is None:
            return len(allowed)
        cores.add((package.strip(), core.strip()))
    return max(1, len(cores))

"""Device profiles (data in `data/profiles.toml`): a board's memory, CPU and bandwidth, as the
planner assumes them before anything has been measured on the device."""

from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Profile:
    key: str
    board_prefix: str | None
    architecture: str
    cpu: str | None
    cores: int | None
    features: tuple[str, ...]
    memory_bytes: int | None
    theoretical_bandwidth_bytes_per_s: float | None
    expected_bandwidth_bytes_per_s: float | None
    source: str


def load_profiles() -> dict[str, Profile]:
    data = tomllib.loads((resources.files("appliance") / "data" / "profiles.toml").read_text())
    families: dict[str, dict[str, Any]] = data["family"]
    profiles = {}
    for key, entry in data["profile"].items():
        family = dict(families[entry["family"]])
        if "same_as" in family:
            family = {**families[family.pop("same_as")], **family}
        profiles[key] = Profile(
            key=key,
            board_prefix=family.get("board_prefix"),
            architecture=family.get("architecture", "aarch64"),
            cpu=family.get("cpu"),
            cores=family.get("cores"),
            features=tuple(family.get("features", ())),
            memory_bytes=entry.get("memory_bytes"),
            theoretical_bandwidth_bytes_per_s=family.get("theoretical_bandwidth_bytes_per_s"),
            expected_bandwidth_bytes_per_s=family.get("expected_bandwidth_bytes_per_s"),
            source=family.get("source", ""),
        )
    return profiles


def match(report: dict[str, Any], architecture: str | None = None) -> Profile:
    """The profile of the machine `detect.detect()` described: its board and RAM, or
    the generic profile of its architecture."""
    profiles = load_profiles()
    board = report["board"].get("model") or ""
    memory = report["board"].get("memory_bytes")
    for profile in profiles.values():
        if profile.board_prefix and board.startswith(profile.board_prefix) \
                and profile.memory_bytes == memory:
            return profile
    machine = architecture or platform.machine()
    return profiles["generic-x86_64" if machine in ("x86_64", "AMD64") else "generic-arm64"]

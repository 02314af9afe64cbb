"""The sha256 of a model file, cached beside it (or in the state directory) by size and mtime,
and checked against a pinned value before llama.cpp parses the file."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.exitcodes import ModelFileError
from appliance.util import sha256_of_file, write_atomically


def _cache_locations(path: Path, fallback_dir: Path | None) -> list[Path]:
    locations = [path.with_name(path.name + ".sha256.json")]
    if fallback_dir is not None:
        locations.append(fallback_dir / f"{path.name}.sha256.json")
    return locations


def file_sha256(path: Path, state_dir: Path | None = None) -> str:
    """The file's sha256, from a cache beside it (or in state_dir) keyed by size and mtime."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    locations = _cache_locations(path, state_dir)
    for cache in locations:
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
            return str(cached["sha256"])
    digest = sha256_of_file(path)
    record = json.dumps({**key, "sha256": digest}).encode()
    for cache in locations:  # the model directory may be read-only for the service
        try:
            write_atomically(cache, record)
            break
        except OSError:
            continue
    return digest


def verify_sha256(path: Path, expected: str | None, state_dir: Path | None = None) -> str:
    actual = file_sha256(path, state_dir)
    if expected is not None and actual != expected:
        raise ModelFileError(
            f"{path}: sha256 {actual} does not match the pinned model.sha256 {expected}; "
            "the file is corrupt or not the model you meant. Re-download it, or fix the pin")
    return actual

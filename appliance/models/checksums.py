"""The sha256 of a model file, cached beside it (or in the state directory), and checked against
a pinned value before llama.cpp parses the file.

The cache is keyed by the file's identity and change time as well as its size and mtime: anyone
who may write the file can restore its size and mtime after changing it, but every write (and
every utime) sets the ctime to now, and only the clock's owner could turn that back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from appliance.exitcodes import ModelFileError
from appliance.util import sha256_of_file, write_atomically


def _cache_locations(path: Path, fallback_dir: Path | None) -> list[Path]:
    locations = [path.with_name(path.name + ".sha256.json")]
    if fallback_dir is not None:
        locations.append(fallback_dir / f"{path.name}.sha256.json")
    return locations


def file_sha256(path: Path, state_dir: Path | None = None,
                progress: Callable[[int], None] | None = None) -> str:
    """The file's sha256, from a cache beside it (or in state_dir) while the file is unchanged."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
           "inode": stat.st_ino, "device": stat.st_dev}
    locations = _cache_locations(path, state_dir)
    for cache in locations:
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
            return str(cached["sha256"])
    digest = sha256_of_file(path, progress)
    record = json.dumps({**key, "sha256": digest}).encode()
    for cache in locations:  # the model directory may be read-only for the service
        try:
            write_atomically(cache, record)
            break
        except OSError:
            continue
    return digest


def verify_sha256(path: Path, expected: str | None, state_dir: Path | None = None,
                  progress: Callable[[int], None] | None = None) -> str:
    """The file's sha256, which must be `expected` when that is set; `progress` is told the
    bytes of each chunk read, when the file has to be read."""
    actual = file_sha256(path, state_dir, progress)
    if expected is not None and actual != expected:
        raise ModelFileError(
            f"{path}: sha256 {actual} does not match the pinned model.sha256 {expected}; "
            "the file is corrupt or not the model you meant. Re-download it, or fix the pin")
    return actual

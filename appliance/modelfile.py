"""Checks on a model file before llama.cpp parses it: GGUF header sanity and sha256.

llama.cpp's GGUF parser has had memory-safety bugs, so a file is looked at (and, when a
checksum is pinned, verified) before it is handed over.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .exitcodes import ExitCode, ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
# Far above any real model (a 70B model has ~700 tensors and ~50 metadata keys).
MAX_TENSORS = 1_000_000
MAX_METADATA_KEYS = 100_000
HASH_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata_count: int


def read_gguf_header(path: Path) -> GgufHeader:
    """Validate the fixed GGUF header; raise ModelFileError saying what is wrong."""
    try:
        with path.open("rb") as handle:
            head = handle.read(24)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found", ExitCode.MODEL_MISSING) from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file",
                             ExitCode.MODEL_MISSING) from None
    except PermissionError as exc:
        raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror}",
                             ExitCode.MODEL_MISSING) from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"{path}: not a GGUF model file (no GGUF header); "
            "download the model again or point model.path at a .gguf file")
    version, tensors, keys = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported "
                             f"(supported: {', '.join(map(str, SUPPORTED_GGUF_VERSIONS))})")
    if tensors == 0 or tensors > MAX_TENSORS or keys > MAX_METADATA_KEYS:
        raise ModelFileError(f"{path}: implausible GGUF header ({tensors} tensors, "
                             f"{keys} metadata keys); the file is corrupt")
    return GgufHeader(version, tensors, keys)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` so that a crash leaves either the old or the new content."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _cache_locations(path: Path, fallback_dir: Path | None) -> list[Path]:
    locations = [path.with_name(path.name + ".sha256.json")]
    if fallback_dir is not None:
        locations.append(fallback_dir / f"{path.name}.sha256.json")
    return locations


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """The file's sha256, from a cache beside it (or in cache_dir) keyed by size and mtime."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    locations = _cache_locations(path, cache_dir)
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


def verify_sha256(path: Path, expected: str | None, cache_dir: Path | None = None) -> str:
    actual = file_sha256(path, cache_dir)
    if expected is not None and actual != expected:
        raise ModelFileError(
            f"{path}: sha256 {actual} does not match the pinned model.sha256 {expected}; "
            "the file is corrupt or not the model you meant. Re-download it, or fix the pin")
    return actual


def quantization_name(file_type: int | None) -> str | None:
    """llama.cpp's `general.file_type` number as the name users know (Q4_K_M, ...)."""
    if file_type is None:
        return None
    from llama_cpp import llama_cpp  # import here: the table lives in the compiled bindings

    prefix = "LLAMA_FTYPE_MOSTLY_"
    for name in dir(llama_cpp):
        if name.startswith(prefix) and getattr(llama_cpp, name) == file_type:
            return name.removeprefix(prefix)
    if file_type == getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32", 0):
        return "F32"
    return f"type {file_type}"

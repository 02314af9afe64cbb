"""Decode is bound by memory bandwidth: every generated token reads the weights it uses and the
KV cache so far. This module measures the machine's read bandwidth and turns it into the ceiling
a model's decode speed cannot exceed, so a measured tokens/s can be read as a fraction of it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from .conditions import now_iso
from .modelfile import write_atomically

BANDWIDTH_FILE = "bandwidth.json"


def measure_read_bandwidth(threads: int, size_bytes: int = 512 << 20,
                           repetitions: int = 5) -> float:
    """Bytes per second that `threads` threads read from a buffer far larger than the caches
    (the best of `repetitions`; numpy's reductions release the GIL, so threads run in parallel)."""
    import numpy as np  # a dependency of llama-cpp-python

    buffer = np.ones(size_bytes // 8, dtype=np.uint64)
    chunks = np.array_split(buffer, threads)
    best = 0.0
    for _ in range(repetitions):
        barrier = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=_read_after, args=(barrier, chunk))
                   for chunk in chunks]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        for worker in workers:
            worker.join()
        best = max(best, buffer.nbytes / (time.perf_counter() - started))
    return best


def _read_after(barrier: threading.Barrier, chunk: Any) -> None:
    barrier.wait()  # all threads start reading together
    chunk.sum()


def save_bandwidth(state_dir: Path, bytes_per_second: float, threads: int) -> dict[str, Any]:
    record = {"read_bytes_per_second": bytes_per_second, "threads": threads,
              "measured_at": now_iso()}
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(state_dir / BANDWIDTH_FILE, json.dumps(record, indent=2).encode())
    return record


def load_bandwidth(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / BANDWIDTH_FILE).read_text())
    except (OSError, ValueError):
        return None


def kv_bytes_per_token(metadata: dict[str, str], element_bytes: int = 2) -> int | None:
    """Bytes of K and V one context token occupies (f16 cache by default), from GGUF metadata."""
    arch = metadata.get("general.architecture")
    try:
        layers = int(metadata[f"{arch}.block_count"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(metadata.get(f"{arch}.attention.key_length")
                       or int(metadata[f"{arch}.embedding_length"]) // heads)
    except (KeyError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * element_bytes


def ceiling(bandwidth: float, weight_bytes: int, metadata: dict[str, str],
            depth: int) -> dict[str, Any] | None:
    """Tokens/s if every token only had to read its weights and the KV cache at `depth`."""
    per_token_kv = kv_bytes_per_token(metadata)
    if per_token_kv is None:
        return None
    bytes_per_token = weight_bytes + per_token_kv * depth
    return {"bandwidth_gb_per_second": bandwidth / 1e9, "bytes_per_token": bytes_per_token,
            "depth": depth, "ceiling_tokens_per_second": bandwidth / bytes_per_token}


def default_threads() -> int:
    return os.cpu_count() or 1

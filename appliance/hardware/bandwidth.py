"""The machine's memory read bandwidth: measured (`pi-appliance bench --bandwidth`) and stored in
the state directory, where the planner and the roofline read it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from appliance.util import now_iso, write_atomically

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

"""Thread count by measurement: the count at which this model decodes fastest on this device.

On a Pi 5 small dense models decode faster on 2 threads than on 4, while some k-quants are faster
on 4: no rule of thumb is right for every model, so the service times decode on its own loaded
model at 1…physical cores, keeps the fastest, and stores the figures per model file (by sha256)
in `<state_dir>/threads.json`, so that later starts of the same model skip the measurement.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.util import now_iso, read_state_file, write_atomically

log = logging.getLogger(__name__)

THREADS_FILE = "threads.json"
# Tokens timed per count and round: enough to average out one slow step, short enough that an
# emulated device (about 1 tok/s) finishes the sweep in a minute.
SWEEP_TOKENS = 8
ROUNDS = 2


def use_threads(llama: Any, threads: int, batch_threads: int | None = None) -> None:
    """Change a loaded model's thread counts (decode, prompt batches) without reloading it."""
    llama._ctx.set_n_threads(threads, batch_threads or threads)  # llama-cpp-python has no setter


def decode_rates(llama: Any, counts: list[int], tokens: int = SWEEP_TOKENS,
                 progress: Callable[[str], None] = log.info) -> dict[int, float]:
    """Decode tokens/s of a loaded llama-cpp-python model at each thread count, at depth 0.

    Rounds go up and then down the counts, and each count keeps its best round, so that a
    neighbour's burst of load on a shared machine does not decide the choice."""
    chooser = random.Random(0)  # noqa: S311 - reproducible tokens, not secrets
    vocab = range(256, llama.n_vocab())  # ordinary tokens: past most vocabs' control tokens
    rates: dict[int, float] = {}
    llama.reset()
    llama.eval([chooser.choice(vocab)])  # pages the weights in before anything is timed
    for round_number in range(ROUNDS):
        for threads in counts if round_number % 2 == 0 else counts[::-1]:
            use_threads(llama, threads)
            llama.reset()
            started = time.perf_counter()
            for _ in range(tokens):
                llama.eval([chooser.choice(vocab)])
            rate = tokens / (time.perf_counter() - started)
            rates[threads] = max(rates.get(threads, 0.0), rate)
            progress(f"threads {threads}: {rate:.2f} tok/s")
    llama.reset()
    return rates


def fastest(rates: dict[int, float]) -> int:
    """The fastest count; among counts within 2 % of it the fewest, which leaves cores free."""
    best = max(rates.values())
    return min(threads for threads, rate in rates.items() if rate >= 0.98 * best)


def stored_choice(state_dir: Path | None, sha256: str) -> dict[str, Any] | None:
    if state_dir is None:
        return None
    return (read_state_file(state_dir / THREADS_FILE) or {}).get(sha256)


def store_choice(state_dir: Path | None, sha256: str, rates: dict[int, float]) -> dict[str, Any]:
    choice = {"threads": fastest(rates), "measured_at": now_iso(),
              "tg_tokens_per_second": {str(threads): round(rate, 3)
                                       for threads, rate in sorted(rates.items())}}
    if state_dir is not None:
        path = state_dir / THREADS_FILE
        stored = read_state_file(path) or {}
        try:
            write_atomically(path, json.dumps(stored | {sha256: choice}, indent=2).encode())
        except OSError as error:  # measured again at the next start; serving goes on
            log.warning("cannot store the thread measurement in %s: %s", path, error)
    return choice

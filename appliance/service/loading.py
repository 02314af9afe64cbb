"""Opening a model with llama.cpp without letting a bad file take the service down with it.

llama.cpp checks a GGUF's tensor table with assertions: a corrupt file that passes our own
checks (models/gguf.py) can make it call abort(), which kills the process without a word in the
log, and systemd restarts it into the same abort for ever. So the first load of each file (by its
sha256, per llama.cpp version) is a trial in a child process: it loads the model with the
service's settings and evaluates one token. When the trial fails, its last words — llama.cpp's
own reason — become the error, with the exit code of a bad model, which systemd does not
restart. The trial's pages stay in the page cache, so the real load after it is quick.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode, ModelFileError
from appliance.settings import ModelSettings
from appliance.util import read_state_file, write_atomically

TRIALS_FILE = "trial-loads.json"
# model.kv_cache_type → llama.cpp's element type for the K and V caches.
KV_CACHE_GGML_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
# A step of loading (a trial, a load) may take this long at least, and as long as reading the
# file at the slowest rate a working drive manages (an SD card reads about 40 MB/s): beyond
# that the drive or the network mount under the model is hung, not slow.
LOAD_FLOOR_SECONDS = 120.0
SLOWEST_READ_BYTES_PER_SECOND = 10e6
# Lines of the trial's output kept for the error: llama.cpp's reason is among its last words.
OUTPUT_LINES_KEPT = 40
REASON_MARKERS = ("error", "failed", "assert", "invalid", "abort", "unsupported")


def load_time_bound(size_bytes: int) -> float:
    return LOAD_FLOOR_SECONDS + size_bytes / SLOWEST_READ_BYTES_PER_SECOND


def llama_arguments(settings: ModelSettings, threads: int, *, verbose: bool) -> dict[str, Any]:
    """Keyword arguments of llama_cpp.Llama for these settings (imports the native library)."""
    from llama_cpp import llama_cpp

    cache_type = getattr(llama_cpp, KV_CACHE_GGML_TYPES[settings.kv_cache_type])
    return {
        "model_path": str(settings.path), "n_threads": threads, "n_threads_batch": threads,
        "n_ctx": settings.context, "n_batch": settings.batch,
        "flash_attn": settings.flash_attention, "type_k": cache_type, "type_v": cache_type,
        "use_mmap": True, "use_mlock": settings.mlock, "verbose": verbose,
    }


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def passed_trial(state_dir: Path | None, sha256: str) -> bool:
    if state_dir is None:
        return False
    return (read_state_file(state_dir / TRIALS_FILE) or {}).get(sha256) == _llama_cpp_version()


def _record_trial(state_dir: Path | None, sha256: str) -> None:
    if state_dir is None:
        return
    trials = read_state_file(state_dir / TRIALS_FILE) or {}
    write_atomically(state_dir / TRIALS_FILE,
                     json.dumps({**trials, sha256: _llama_cpp_version()}, indent=2).encode())


def _reason(lines: deque[str]) -> str:
    telling = [line for line in lines if any(mark in line.lower() for mark in REASON_MARKERS)]
    return " | ".join((telling or list(lines))[-3:]) or "no output"


class TrialLoad:
    """One trial in a child process; `stop()` ends it from another thread (a shutdown)."""

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self._process: subprocess.Popen[str] | None = None
        self._stopped = threading.Event()

    def run(self, sha256: str, state_dir: Path | None, size_bytes: int) -> None:
        """Raise ModelFileError (or ApplianceError) when llama.cpp cannot load and run it."""
        path = self.settings.path
        output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, self.settings.model_dump_json()],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            # ggml's abort otherwise attaches gdb for a backtrace: slow, and it buries the reason.
            env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        if self._stopped.is_set():
            self._process.kill()
        reader = threading.Thread(target=lambda: output.extend(self._process.stdout or ()),
                                  daemon=True)
        reader.start()
        bound = load_time_bound(size_bytes)
        try:
            code = self._process.wait(bound)
        except subprocess.TimeoutExpired:
            self._process.kill()
            # A process blocked inside the kernel on a hung drive may outlive SIGKILL.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
            raise ModelFileError(
                f"{path}: a trial load made no progress in {bound:.0f} s: the drive or network "
                "mount under the model is not answering (see dmesg)",
                ExitCode.MODEL_MISSING) from None
        finally:
            reader.join(5)
            if self._process.stdout:
                self._process.stdout.close()
        if self._stopped.is_set():
            raise ApplianceError("stopped during the trial load", ExitCode.OK)
        if code == 0:
            _record_trial(state_dir, sha256)
            return
        if code == -signal.SIGKILL:
            raise ApplianceError(f"{path}: the trial load was killed, most likely for want of "
                                 "memory (see dmesg): choose a smaller model or context",
                                 ExitCode.TRANSIENT)
        how = (f"died of {signal.Signals(-code).name}" if code < 0 else f"failed (exit {code})")
        raise ModelFileError(
            f"{path}: llama.cpp {how} loading the model: {_reason(output)}; the file is "
            "truncated or corrupt, or not a model this llama.cpp supports: download it again "
            "and check its sha256")

    def stop(self) -> None:
        self._stopped.set()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()


def _trial(settings_json: str) -> int:
    from llama_cpp import Llama

    settings = ModelSettings.model_validate_json(settings_json)
    try:
        llama = Llama(**llama_arguments(settings, 1, verbose=True))
    except ValueError as exc:  # llama-cpp-python's wording for "llama.cpp refused it"
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.MODEL_INVALID
    llama.eval([llama.token_bos() if llama.token_bos() >= 0 else 0])
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(_trial(sys.argv[1]))

"""Small helpers every layer uses: durable writes, checksums, JSON state files, timestamps,
byte counts for people, the service's /health, and a command-line parser with sysexits' usage
code. Standard library only, so that any module may import it."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from appliance.exitcodes import ExitCode, ModelFileError

HASH_CHUNK_BYTES = 4 * 1024 * 1024
SHA256_DIGITS = frozenset("0123456789abcdef")
# The names a client may use for this machine itself.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# The appliance's own service is never asked through a proxy, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` so that a crash leaves either the old or the new content."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
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


def filesystem_space(path: Path) -> tuple[int, int] | None:
    """(bytes free to an unprivileged user, size) of the filesystem holding `path`."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize


def sha256_digest(value: str) -> str:
    """`value` as a sha256 in lowercase hex; ValueError saying what it must be otherwise."""
    digest = value.lower()
    if len(digest) != 64 or not SHA256_DIGITS.issuperset(digest):
        raise ValueError("must be 64 hexadecimal digits, as `sha256sum FILE` prints")
    return digest


def sha256_of_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The file's sha256; `progress` is told the bytes of each chunk as it is read."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


@contextmanager
def model_file_reads(path: Path) -> Iterator[None]:
    """Reads of the model file `path`: an OSError in them (a symlink loop, permissions, a failing
    drive) is a ModelFileError with exit 66, "cannot be read", which says what to check. Not a
    traceback and exit 70, which systemd would restart into the same error."""
    try:
        yield
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found", ExitCode.MODEL_MISSING) from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror or exc}; check "
                             "the path, its permissions and the drive (dmesg)",
                             ExitCode.MODEL_MISSING) from None


def read_state_file(path: Path) -> dict[str, Any] | None:
    """A JSON state file (the verdict, the fallback history), or None if absent or unreadable."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def human_bytes(size: float) -> str:
    """GB from 0.1 GB up, so that model sizes and memory budgets compare in one unit."""
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def aligned(lines: list[list[str]]) -> str:
    """Rows of cells as columns; the last column is left unpadded (it holds long free text)."""
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths,
                                                                       strict=True))
                     + "  " + line[-1] for line in lines)


def fetch_health(url: str, timeout: float = 10) -> dict[str, Any]:
    """The /health body of the service at `url`, whatever its status code (503 still describes
    the service). Raises OSError when nothing answers, ValueError when the answer is not JSON."""
    try:
        with _DIRECT.open(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


class Parser(argparse.ArgumentParser):
    """argparse, with sysexits' code for a usage error instead of argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")

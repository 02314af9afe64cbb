"""Installed models: a store where nothing unverified is ever activated.

Layout of the models directory:
    <sha256>.gguf    a verified model (content-addressed: the name is its checksum)
    <sha256>.json    where it came from, when, and how it was verified
    active           symlink to the model the service loads (model.path points here)
    previous         symlink to the model `rollback` returns to
    .partial/        downloads and pushes in progress, resumed after a dropped connection
                     (`list` shows them, and an `active` or `previous` link whose model is gone)

A file is staged in the same filesystem, checked (sha256, GGUF header, complete tensor data),
fsynced and renamed into place; the `active` link is switched with a rename. Power loss at any
moment leaves either the old or the new model active, never a half-written one. What root adds
(`sudo pi-appliance model …`, `fleet push-model`) is given to the directory's owner, the service
user, whose fallback switches models.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import importlib
import json
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.exitcodes import ApplianceError, ExitCode, ModelFileError
from appliance.models.catalog import Variant
from appliance.models.gguf import check_complete, read_gguf_header
from appliance.util import (
    LOOPBACK_HOSTS,
    fsync_directory,
    human_bytes,
    model_file_reads,
    now_iso,
    sha256_digest,
    sha256_of_file,
    write_atomically,
)

Progress = Callable[[str], None]
DOWNLOAD_ATTEMPTS = 6
PROGRESS_INTERVAL_SECONDS = 2.0


class TransferCut(ApplianceError):
    """The connection went away; what arrived is kept in `.partial/` to resume from."""

    exit_code = ExitCode.TRANSIENT


class DiskFull(ApplianceError):
    def __init__(self, message: str):
        super().__init__(message, ExitCode.TRANSIENT)


@dataclass(frozen=True)
class _Packaged:
    module: Any
    file_name: str | None
    function: str | None

    @property
    def path(self) -> Path:
        return Path(str(resources.files(self.module) / (self.file_name or "")))


def _python_package_file(variant: Variant) -> _Packaged | None:
    """The installed Python package that ships `variant` ("module/file" or "module:function"
    that assembles it), or None when there is none."""
    if not variant.python_source:
        return None
    module_name, _, function = variant.python_source.partition(":")
    module_name, _, file_name = module_name.partition("/")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return _Packaged(module, file_name or None, function or None)


def _checked_sha256(value: str | None) -> str | None:
    """An expected checksum, lowercased, refused unless it is one: it names files in the store
    (`<sha256>.gguf`, `.partial/<sha256>.part`), so `../x` would write and delete outside it."""
    if value is None:
        return None
    try:
        return sha256_digest(value)
    except ValueError as error:
        raise ApplianceError(f"--sha256 {value!r}: {error}", ExitCode.USAGE) from None


def catalog_id_of(path: Path) -> str | None:
    """The catalog id a store recorded for the model `path` (e.g. the `active` link) points to."""
    record = path.resolve().with_suffix(".json")
    try:
        return json.loads(record.read_text()).get("catalog_id")
    except (OSError, ValueError, AttributeError):
        return None


def packaged_file(variant: Variant) -> Path | None:
    """The GGUF file an installed Python package ships as is for `variant`, if any."""
    packaged = _python_package_file(variant)
    return packaged.path if packaged is not None and packaged.file_name else None


class ModelStore:
    def __init__(self, directory: Path, progress: Progress = lambda message: None):
        self.directory = directory
        self.partial_dir = directory / ".partial"
        self.progress = progress

    # What is installed ---------------------------------------------------------------------
    def _link_target(self, name: str) -> str | None:
        try:
            return Path(os.readlink(self.directory / name)).name
        except OSError:
            return None

    def active(self) -> Path | None:
        target = self._link_target("active")
        return self.directory / target if target else None

    def installed(self) -> list[dict[str, Any]]:
        active, previous = self._link_target("active"), self._link_target("previous")
        entries = []
        for model in sorted(self.directory.glob("*.gguf")):
            record = self.record(model.name.removesuffix(".gguf"))
            entries.append(record | {"file": model.name, "size_bytes": model.stat().st_size,
                                     "active": model.name == active,
                                     "previous": model.name == previous})
        return entries

    def leftovers(self) -> list[dict[str, Any]]:
        """What `installed` leaves out and a person should see: partial downloads, and `active`
        or `previous` links to a model that is gone, each with its `problem` and what to do.
        Neither active nor previous (for `model list --json` readers that select on those)."""
        found = [{"file": f"{self.partial_dir.name}/{part.name}",
                  "size_bytes": part.stat().st_size,
                  "problem": "partial download: run the same `pi-appliance model install` "
                  "again to resume it, or delete it"}
                 for part in sorted(self.partial_dir.glob("*")) if part.is_file()]
        for name, fix in (("active", "the service cannot start: run `pi-appliance model "
                           "activate SHA256-PREFIX` with an installed model, or install one"),
                          ("previous", "nothing to roll back to; the next `activate` replaces "
                           "the link")):
            target = self._link_target(name)
            if target is not None and not (self.directory / name).exists():
                found.append({"file": name,
                              "problem": f"links to {target}, which is missing; {fix}"})
        return [entry | {"active": False, "previous": False} for entry in found]

    def record(self, sha256: str) -> dict[str, Any]:
        try:
            return json.loads((self.directory / f"{sha256}.json").read_text())
        except (OSError, ValueError):
            return {"sha256": sha256}

    def _find(self, sha_prefix: str) -> Path:
        matches = [p for p in self.directory.glob("*.gguf") if p.name.startswith(sha_prefix)]
        if len(matches) != 1:
            raise ApplianceError(
                f"{'no' if not matches else 'more than one'} installed model matches "
                f"{sha_prefix!r}: see `pi-appliance model list`", ExitCode.NOT_OK)
        return matches[0]

    def _give_to_owner(self, path: Path) -> None:
        """Root's additions belong to the store's owner, who must read and switch them."""
        if os.geteuid() == 0:
            owner = self.directory.stat()
            if owner.st_uid != 0:
                os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(exist_ok=True)
        self._give_to_owner(self.partial_dir)

    # Switching ---------------------------------------------------------------------------
    def _point(self, name: str, target: Path) -> None:
        staging = self.directory / f".{name}.new"
        staging.unlink(missing_ok=True)
        staging.symlink_to(target.name)
        self._give_to_owner(staging)
        os.replace(staging, self.directory / name)

    def activate(self, sha_prefix: str) -> Path:
        model = self._find(sha_prefix)
        current = self.active()
        if current is not None and current.name != model.name:
            self._point("previous", current)
        self._point("active", model)
        fsync_directory(self.directory)
        return model

    def rollback(self) -> Path:
        previous = self._link_target("previous")
        if previous is None or not (self.directory / previous).exists():
            raise ApplianceError("there is no previous model to roll back to", ExitCode.NOT_OK)
        return self.activate(previous.removesuffix(".gguf"))

    # Installing --------------------------------------------------------------------------
    def installable(self, variant: Variant) -> bool:
        """Installed already, or installable without a person or a network (the verifier that
        falls back may reach only localhost): a pinned checksum and an installed package."""
        if variant.sha256 and (self.directory / f"{variant.sha256}.gguf").exists():
            return True
        return bool(variant.sha256 and _python_package_file(variant))

    def install_variant(self, variant: Variant, *, sha256: str | None = None, trust: bool = False,
                        activate: bool = True, mirror: str | None = None) -> Path:
        """Install a catalog variant: from the Python package that ships it when that is
        installed, else from a LAN mirror (same file name) or the catalog's URL."""
        expected = _checked_sha256(sha256) or variant.sha256
        if expected is None and not trust:
            raise ApplianceError(
                f"the catalog has no verified sha256 for {variant.id}: take it from the model "
                "card and pass --sha256, or --trust-unverified (recorded as trusted)",
                ExitCode.NOT_OK)
        packaged = _python_package_file(variant)
        if packaged is not None and packaged.file_name is None:  # assembled from parts
            self.partial_dir.mkdir(parents=True, exist_ok=True)
            assembled = self.partial_dir / f"{variant.id}.assembled"
            try:
                getattr(packaged.module, packaged.function)(assembled, overwrite=True)
                return self.install(str(assembled), expected, trust=trust, activate=activate,
                                    catalog_id=variant.id, label=variant.python_source)
            finally:
                assembled.unlink(missing_ok=True)
        if packaged is not None:
            source = str(packaged.path)
        elif variant.urls:
            url = variant.urls[0]
            source = f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if mirror else url
        else:
            raise ApplianceError(f"{variant.id} has no download URL and its package "
                                 f"({variant.python_source}) is not installed", ExitCode.NOT_OK)
        return self.install(source, expected, trust=trust, activate=activate,
                            catalog_id=variant.id)

    def install(self, source: str, sha256: str | None = None, *, trust: bool = False,
                activate: bool = True, catalog_id: str | None = None,
                label: str | None = None) -> Path:
        """Fetch or copy `source`, verify it, add it to the store, and (by default) activate it.

        Without a sha256 the file is only accepted with `trust=True`, and the store records
        that it was trusted rather than verified.
        """
        if sha256 is None and not trust:
            raise ApplianceError(
                "no sha256 to verify the model against: pass --sha256 (recommended), or "
                "--trust-unverified to accept the file as it is (recorded as trusted)",
                ExitCode.NOT_OK)
        expected = _checked_sha256(sha256)
        if expected and (self.directory / f"{expected}.gguf").exists():
            return self._already_installed(expected, activate)
        self._prepare()
        key = expected or hashlib.sha256(source.encode()).hexdigest()
        staging = self.partial_dir / f"{key}.part"
        if urllib.parse.urlsplit(source).scheme in ("http", "https"):
            def fetch() -> None:
                self._download(source, staging, expected)
        else:
            def fetch() -> None:
                self._copy(Path(source), staging)
        return self._add(fetch, staging, expected, activate=activate, catalog_id=catalog_id,
                         label=label or source)

    def receive(self, stream: Any, sha256: str, size: int, offset: int, *,
                activate: bool = True, catalog_id: str | None = None) -> Path:
        """Install a model streamed in (`fleet push-model` over SSH) from byte `offset`: what
        an earlier, cut stream left in `.partial/` is kept and continued."""
        expected = _checked_sha256(sha256)
        if expected is None:
            raise ApplianceError("a streamed model needs --sha256", ExitCode.USAGE)
        if (self.directory / f"{expected}.gguf").exists():
            return self._already_installed(expected, activate)
        self._prepare()
        staging = self.partial_dir / f"{expected}.part"
        held = staging.stat().st_size if staging.exists() else 0
        if held > size:  # longer than the file: not the start of it
            staging.unlink()
            held = 0
        if offset != held:
            raise ApplianceError(f"{human_bytes(held)} ({held} bytes) of this model are here "
                                 f"already, not {offset}: send from byte {held}", ExitCode.USAGE)

        self._check_space(size - held)  # before `_add`, which would discard what is held

        def write() -> None:
            with staging.open("ab") as writer:
                self._give_to_owner(staging)
                done = self._write(stream, writer, held, size, time.monotonic(),
                                   f"{expected[:12]}….gguf")
            if done < size:
                raise TransferCut(f"the stream ended at {human_bytes(done)} of "
                                      f"{human_bytes(size)}; send it again to resume")
            if done > size:
                raise ModelFileError(f"{done} bytes arrived, {size} were announced; the file "
                                     "was discarded")

        return self._add(write, staging, expected, activate=activate, catalog_id=catalog_id,
                         label="pushed over SSH (fleet push-model)")

    def _already_installed(self, sha256: str, activate: bool) -> Path:
        self.progress(f"{sha256[:12]}… is already installed")
        return self.activate(sha256) if activate else self.directory / f"{sha256}.gguf"

    def _add(self, fetch: Callable[[], None], staging: Path, expected: str | None, *,
             activate: bool, catalog_id: str | None, label: str) -> Path:
        """Fetch into `staging`, check it, and rename it into the store."""
        try:
            fetch()
            actual = sha256_of_file(staging)
            if expected and actual != expected:
                raise ModelFileError(
                    f"checksum mismatch for {label}: expected {expected}, got {actual}; the "
                    "file was discarded and the active model is unchanged")
            read_gguf_header(staging)
            check_complete(staging)
        except BaseException as error:
            # Keep a partial download only if it can be resumed: a dropped connection.
            if not isinstance(error, TransferCut):
                staging.unlink(missing_ok=True)
            raise
        with staging.open("rb+") as handle:
            os.fsync(handle.fileno())
        final = self.directory / f"{actual}.gguf"
        self._give_to_owner(staging)
        os.replace(staging, final)
        fsync_directory(self.directory)
        record = {"sha256": actual, "source": label, "installed_at": now_iso(),
                  "verified": "sha256" if expected else "trusted (no checksum given)"}
        if catalog_id:
            record["catalog_id"] = catalog_id
        write_atomically(self.directory / f"{actual}.json", json.dumps(record, indent=2).encode())
        self._give_to_owner(self.directory / f"{actual}.json")
        self.progress(f"installed {final.name} ({human_bytes(final.stat().st_size)})")
        return self.activate(actual) if activate else final

    def _check_space(self, needed: int) -> None:
        stats = os.statvfs(self.directory)
        free = stats.f_bavail * stats.f_frsize
        if needed > free:
            raise DiskFull(f"not enough space in {self.directory}: the model needs "
                           f"{human_bytes(needed)} more, {human_bytes(free)} is free; "
                           "nothing was written")

    def _write(self, source: Any, target: Any, done: int, total: int | None, started: float,
               label: str) -> int:
        """Copy `source` into `target`, reporting progress; a full disk removes the staging."""
        last_report = 0.0
        while block := source.read(1 << 20):
            try:
                target.write(block)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise DiskFull(f"the disk holding {self.directory} filled up while writing "
                                   f"{label}; the partial file was removed") from error
                raise
            done += len(block)
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL_SECONDS:
                last_report = now
                rate = done / max(now - started, 1e-9)
                eta = f", {(total - done) / rate:.0f} s left" if total and rate else ""
                self.progress(f"{label}: {human_bytes(done)}"
                              + (f" of {human_bytes(total)}" if total else "")
                              + f" at {human_bytes(rate)}/s{eta}")
        return done

    def _copy(self, source: Path, staging: Path) -> None:
        with model_file_reads(source):
            info = source.stat()
            # Checked before opening: opening a FIFO would block for ever.
            if not stat.S_ISREG(info.st_mode):
                raise ModelFileError(f"{source}: not a regular file (a directory, pipe or "
                                     "device); give a .gguf file", ExitCode.MODEL_MISSING)
            reader = source.open("rb")
        self._check_space(info.st_size)
        with reader, staging.open("wb") as writer:
            self._write(reader, writer, 0, info.st_size, time.monotonic(), source.name)

    def _download(self, url: str, staging: Path, expected: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "http" and not expected and parts.hostname not in LOOPBACK_HOSTS:
            raise ApplianceError("a plain-http download needs --sha256: nothing else would "
                                 "detect a file changed on the way", ExitCode.NOT_OK)
        started = time.monotonic()
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            have = staging.stat().st_size if staging.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            request = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) only
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                    if have and response.status != 206:
                        have = 0  # the server ignored the range: start over
                    length = response.headers.get("Content-Length")
                    total = have + int(length) if length else None
                    if length:
                        self._check_space(int(length))
                    with staging.open("ab" if have else "wb") as writer:
                        done = self._write(response, writer, have, total, started,
                                           Path(parts.path).name)
                    if total is not None and done < total:
                        raise http.client.IncompleteRead(b"", total - done)
                    return
            except urllib.error.HTTPError as error:
                raise ApplianceError(f"{url}: HTTP {error.code} {error.reason}",
                                     ExitCode.UNREACHABLE) from None
            except (http.client.IncompleteRead, ConnectionError, TimeoutError,
                    urllib.error.URLError) as error:
                reason = getattr(error, "reason", error)
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise TransferCut(
                        f"{url}: the transfer failed {attempt} times ({reason}); run the same "
                        "command again to resume") from None
                kept = staging.stat().st_size if staging.exists() else 0
                self.progress(f"connection lost ({reason}); resuming at {human_bytes(kept)}")
                time.sleep(min(2 ** attempt, 30) * 0.1)

"""`fleet push-model`: a model file from the control machine to Pis that have no other way in
(an air-gapped site), over the SSH connection Ansible uses. The Pi's own `pi-appliance model
install -` receives it into its store: the same checks (sha256, GGUF header, complete tensor data)
and the same atomic switch as any install. A cut connection leaves what arrived in the store's
`.partial/`, and the next push sends only the rest."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import layout
from appliance.exitcodes import ApplianceError, ExitCode, ModelFileError
from appliance.fleet.inventory import Host
from appliance.fleet.remote import (
    CLI,
    CannotBecomeRoot,
    HostResult,
    Session,
    Unreachable,
    connected,
)
from appliance.models.catalog import get_variant, load_catalog
from appliance.models.gguf import check_complete, read_gguf_header
from appliance.models.store import packaged_file
from appliance.util import aligned, human_bytes, sha256_digest, sha256_of_file

PROGRESS_INTERVAL_SECONDS = 5.0
# Queued, not waited for: loading and verifying a model take minutes (`fleet status` shows them);
# a stopped service stays stopped.
RESTART = f"systemctl --no-block try-restart {layout.UNITS[0]}"


@dataclass(frozen=True)
class LocalModel:
    path: Path
    sha256: str
    size: int
    catalog_id: str | None


@dataclass
class Pushed(HostResult):
    result: str | None = None  # sent, resumed, already installed
    active: bool = False
    restarting: bool = False  # the restart was queued
    sent_bytes: int = 0
    resumed_from: int = 0


def local_model(source: str, sha256: str | None, progress: Callable[[str], None]) -> LocalModel:
    """The file to push for a catalog id or a path, checked here before any Pi sees it."""
    catalog = load_catalog()
    catalog_id = None
    if source in catalog:
        variant = get_variant(source)
        path, catalog_id = packaged_file(variant), variant.id
        if path is None:
            raise ApplianceError(f"{source}: no installed Python package here ships its file; "
                                 "download it on a machine with a network and push the file",
                                 ExitCode.MODEL_MISSING)
        sha256 = sha256 or variant.sha256
    else:
        path = Path(source)
        if not path.is_file():
            raise ApplianceError(f"{source}: neither a catalog id nor a file",
                                 ExitCode.MODEL_MISSING)
    read_gguf_header(path)
    check_complete(path)
    size = path.stat().st_size
    progress(f"checking {path.name} ({human_bytes(size)})")
    actual = sha256_of_file(path)
    if sha256 and sha256_digest(sha256) != actual:
        raise ModelFileError(f"{path} has sha256 {actual}, not {sha256}: it is not the file "
                             "you meant; nothing was sent")
    return LocalModel(path, actual, size, catalog_id)


class Reporter:
    """Progress lines for several hosts at once, one every few seconds per host."""

    def __init__(self, write: Callable[[str], None]):
        self._write = write
        self._lock = threading.Lock()

    def __call__(self, host: str, message: str) -> None:
        with self._lock:
            self._write(f"{host}: {message}")

    def transfer(self, host: str, start: int, total: int) -> Callable[[int], None]:
        started = last = time.monotonic()
        done = start

        def advance(sent: int) -> None:
            nonlocal done, last
            done += sent
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_SECONDS or done == total:
                last = now
                rate = (done - start) / max(now - started, 1e-9)
                left = f", {(total - done) / rate:.0f} s left" if rate and done < total else ""
                self(host, f"{human_bytes(done)} of {human_bytes(total)} at "
                           f"{human_bytes(rate)}/s{left}")
        return advance


def _store_entry(session: Session, model: LocalModel) -> tuple[dict | None, int]:
    """The Pi's record of the model if installed, and the bytes of it a cut push left."""
    listing = session.run(f"{CLI} model list --json", as_root=True)
    if listing.exit_code != 0:
        raise _Failed(f"`pi-appliance model list` failed ({listing.exit_code}): "
                      f"{listing.stderr.strip()[-300:]}")
    try:
        entries = json.loads(listing.stdout)
    except ValueError:
        raise _Failed(f"`pi-appliance model list` printed no list: {listing.stdout[:200]!r}; "
                      "is the Pi's appliance as new as this one?") from None
    installed = next((entry for entry in entries if entry.get("sha256") == model.sha256
                      and entry.get("file") == f"{model.sha256}.gguf"), None)
    held = next((entry["size_bytes"] for entry in entries
                 if entry.get("file") == f".partial/{model.sha256}.part"), 0)
    return installed, held


class _Failed(Exception):
    pass


def push(host: Host, model: LocalModel, *, activate: bool, timeout: float, report: Reporter,
         max_rate: float | None = None) -> Pushed:
    """Send `model` to `host` (at most `max_rate` bytes a second) unless it is there."""
    pushed = Pushed(host.name)
    try:
        with connected(host, timeout) as session:
            _push(session, model, activate, report, pushed, max_rate)
    except Unreachable as error:
        pushed.problems.append(f"unreachable: {error}")
    except (CannotBecomeRoot, _Failed) as error:
        pushed.problems.append(str(error))
    return pushed


def _push(session: Session, model: LocalModel, activate: bool, report: Reporter,
          pushed: Pushed, max_rate: float | None) -> None:
    installed, held = _store_entry(session, model)
    if installed is not None:
        pushed.result, pushed.active = "already installed", installed["active"]
        if not activate or installed["active"]:
            return
        switched = session.run(f"{CLI} model activate {model.sha256}", as_root=True)
        if switched.exit_code != 0:
            raise _Failed(f"activating it failed: {switched.stderr.strip()[-300:]}")
        pushed.active = True
    else:
        if held > model.size:
            held = 0  # not this file's start: the Pi discards it
        pushed.resumed_from = held
        report(pushed.host, f"resuming at {human_bytes(held)}" if held else
               f"sending {human_bytes(model.size)}")
        command = [CLI, "model", "install", "-", "--sha256", model.sha256,
                   "--size", str(model.size), "--offset", str(held)]
        command += ["--catalog-id", model.catalog_id] if model.catalog_id else []
        command += [] if activate else ["--no-activate"]
        advance = report.transfer(pushed.host, held, model.size)

        def sent(count: int) -> None:
            pushed.sent_bytes += count
            advance(count)

        with model.path.open("rb") as source:
            source.seek(held)
            received = session.stream(shlex.join(command), source, sent, max_rate)
        if received.exit_code == ExitCode.TRANSIENT or received.exit_code == 255:
            raise _Failed(f"the transfer was cut ({received.stderr.strip()[-300:]}); run the "
                          "same push again to resume")
        if received.exit_code != 0:
            raise _Failed(f"the Pi refused the model ({received.exit_code}): "
                          f"{received.stderr.strip()[-400:]}")
        pushed.result, pushed.active = "resumed" if held else "sent", activate
    if activate:
        restarted = session.run(RESTART, as_root=True)
        if restarted.exit_code != 0:
            raise _Failed(f"installed and active, but `{RESTART}` failed: "
                          f"{restarted.stderr.strip()[-300:]}")
        pushed.restarting = True


def pushed_table(rows: list[Pushed], model: LocalModel) -> str:
    lines = [["host", "result", "active", "service", "sent", "problems"]]
    for row in rows:
        sent = human_bytes(row.sent_bytes) + (f" (from {human_bytes(row.resumed_from)})"
                                              if row.resumed_from else "")
        lines.append([row.marked_host, row.result or "-",
                      "yes" if row.active else "no",
                      "restarting" if row.restarting else "-", sent,
                      "; ".join(row.problems) or "-"])
    return f"{model.path.name} sha256 {model.sha256}\n\n" + aligned(lines)

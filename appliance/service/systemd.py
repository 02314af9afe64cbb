"""sd_notify: readiness, status, start-up timeout extension and a watchdog that tells the truth.

With no NOTIFY_SOCKET (development, tests without systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from systemd import daemon

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._stop = threading.Event()

    def send(self, *lines: str) -> None:
        if self.enabled:
            daemon.notify("\n".join(lines))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self._stop.set()
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC when it is meant for this process, else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
            return None

    def start_watchdog(self, alive: Callable[[], bool]) -> threading.Thread | None:
        """Ping at half the interval, but only while `alive()`: a hung engine gets restarted."""
        interval = self.watchdog_interval()
        if not self.enabled or interval is None:
            return None

        def run() -> None:
            while not self._stop.wait(interval):
                if alive():
                    self.send("WATCHDOG=1")
                else:
                    log.error("engine made no progress; withholding the watchdog ping")

        thread = threading.Thread(target=run, name="watchdog", daemon=True)
        thread.start()
        return thread

    def keep_extending_start(self, still_starting: Callable[[], bool],
                             status: Callable[[], str], every: float = 5.0) -> threading.Thread:
        """While a long load runs, push systemd's start timeout ahead and report progress."""

        def run() -> None:
            while still_starting() and not self._stop.is_set():
                self.send(f"EXTEND_TIMEOUT_USEC={int(every * 3 * 1_000_000)}",
                          f"STATUS={status()}")
                self._stop.wait(every)

        thread = threading.Thread(target=run, name="start-timeout", daemon=True)
        thread.start()
        return thread

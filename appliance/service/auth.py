"""Bearer API keys, compared in constant time (the key is read once: settings.read_api_key),
and a budget of failed attempts per client address, so that guessing is slow and logged."""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from flask import request

from appliance.service.errors import ApiError

log = logging.getLogger(__name__)

# A client may fail this many times in a window; beyond that it is answered 429 without its key
# being looked at until the window has passed its oldest failure.
FAILURES_ALLOWED = 10
FAILURE_WINDOW_SECONDS = 60.0
# Addresses remembered at most: a flood from many addresses cannot grow memory without end.
ADDRESSES_TRACKED = 4096


class FailedAuthentications:
    """Recent failures by client address."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        self._failures.move_to_end(address)
        while failures and failures[0] <= self._clock() - FAILURE_WINDOW_SECONDS:
            failures.popleft()
        while len(self._failures) > ADDRESSES_TRACKED:
            self._failures.popitem(last=False)
        return failures

    def wait_seconds(self, address: str) -> int:
        """0 when the address may try; else the seconds until it may again."""
        with self._lock:
            failures = self._recent(address)
            if len(failures) < FAILURES_ALLOWED:
                return 0
            return max(1, math.ceil(failures[0] + FAILURE_WINDOW_SECONDS - self._clock()))

    def record(self, address: str) -> int:
        """Count a failure; the number in the current window."""
        with self._lock:
            failures = self._recent(address)
            failures.append(self._clock())
            return len(failures)


def require_api_key(key: bytes | None, failures: FailedAuthentications) -> None:
    """Raise a 401 ApiError unless the request carries `key` as a bearer token (429 for a
    client that failed too often)."""
    if key is None:
        return
    address = request.remote_addr or "unknown"
    wait = failures.wait_seconds(address)
    if wait:
        raise ApiError(429, f"too many failed authentications from {address}; retry after "
                            f"{wait} s", "too_many_failed_authentications",
                       {"Retry-After": str(wait)})
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() == "bearer" and presented and hmac.compare_digest(
            presented.strip().encode(), key):
        return
    count = failures.record(address)
    # One line per failure up to the budget, then silence until the window passes: an
    # attacker cannot flood the journal.
    if count <= FAILURES_ALLOWED:
        log.warning("failed authentication from %s (%s %s): %d in the last %.0f s%s", address,
                    request.method, request.path, count, FAILURE_WINDOW_SECONDS,
                    "; refusing it for the rest of the window" if count == FAILURES_ALLOWED
                    else "")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "missing_api_key", {"WWW-Authenticate": "Bearer"})
    raise ApiError(401, "wrong API key", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

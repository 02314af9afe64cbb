"""What every request must pass before an endpoint sees it: its Host and its Origin.

The Host allow-list stops DNS rebinding (a web page whose name now points at 127.0.0.1). The
Origin check stops a page from calling the API from a visitor's browser at all: browsers
send Origin on cross-site POSTs, and no client of this API but a page it serves itself would.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Request

from appliance.service.errors import ApiError


def host_name(host: str) -> str:
    """The name in a Host header or an address as one spelling: lowercase, no port, no
    brackets around an IPv6 literal, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # name:port; more colons are a bare IPv6 literal
        host = host.partition(":")[0]
    return host.rstrip(".")


def check_host(incoming: Request, allowed: frozenset[str] | None) -> None:
    """Raise a 400 ApiError unless the Host header names this service (`allowed` None: any)."""
    if allowed is None:
        return
    name = host_name(incoming.headers.get("Host", ""))
    if name not in allowed:
        raise ApiError(400, f"Host {name!r} is not one of this server's names "
                            "(server.trusted_hosts)", "untrusted_host")


def check_origin(incoming: Request) -> None:
    """Raise a 403 ApiError for a browser request from another site than this one."""
    origin = incoming.headers.get("Origin")
    if origin is None:
        return
    parts = urlsplit(origin)
    same_site = (parts.hostname is not None and parts.netloc.lower()
                 == incoming.headers.get("Host", "").strip().lower())
    if not same_site:
        raise ApiError(403, f"cross-origin request from {origin!r} refused: the API serves "
                            "programs and its own pages, not other sites", "cross_origin")

"""Bearer API keys: read once from a file, compared in constant time."""

from __future__ import annotations

import hmac
import stat
from pathlib import Path

from flask import request

from .errors import ApiError
from .exitcodes import ConfigError

MIN_KEY_LENGTH = 16


def read_api_key(path: Path) -> bytes:
    """The key in `path`, refusing files others can read and keys too short to be secret."""
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"server.api_key_file = '{path}': cannot read it: {exc.strerror}; "
                          "create it with: umask 077; openssl rand -hex 32 > "
                          f"{path}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(f"server.api_key_file = '{path}': readable by every user "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"server.api_key_file = '{path}': the key is {len(key)} characters; "
                          f"use at least {MIN_KEY_LENGTH} (e.g. openssl rand -hex 32)")
    return key


def require_api_key(key: bytes | None) -> None:
    """Raise a 401 ApiError unless the request carries `key` as a bearer token."""
    if key is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "missing_api_key", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(presented.strip().encode(), key):
        raise ApiError(401, "wrong API key", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

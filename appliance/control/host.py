"""The control machine: its cache, the source tree the artifacts are built from, and running
commands so that a failure says what failed and why."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# The checkout, or the installed Ansible collection: both hold pyproject.toml and constraints.txt
# beside the appliance package.
SOURCE = Path(__file__).resolve().parents[2]


class HostError(RuntimeError):
    """This machine cannot do what was asked; the message says what to do about it."""


def pins() -> dict[str, str]:
    """constraints.txt's `name==version` pins, by normalised name; lines with an environment
    marker (the control machine's own tools) are not the Pi's and are left out."""
    found = {}
    for line in (SOURCE / "constraints.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        name, separator, version = requirement.partition("==")
        if separator and ";" not in version:
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def pin(name: str) -> str:
    try:
        return pins()[name]
    except KeyError:
        raise HostError(f"constraints.txt does not pin {name}: add {name}==<version>") from None


def cache_dir() -> Path:
    """Where built artefacts (root filesystem tarballs, cross builds) are kept between runs."""
    override = os.environ.get("VIRTUAL_PI_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pi-llm-appliance"


def run(*args: str | os.PathLike[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; on failure raise HostError with what it printed."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if "input" not in kwargs:
        # Never the caller's stdin: ssh makes the stdin it inherits non-blocking while it runs,
        # and that file is shared, so an ansible-playbook started beside it refuses to start.
        kwargs.setdefault("stdin", subprocess.DEVNULL)
    try:
        result = subprocess.run([str(arg) for arg in args], check=False, **kwargs)
    except FileNotFoundError as error:
        raise HostError(f"{args[0]} is not installed: {error}") from error
    except subprocess.TimeoutExpired as error:
        if check:
            raise HostError(f"`{' '.join(map(str, args))}` took over {error.timeout} s") from error
        return subprocess.CompletedProcess(error.cmd, 124, error.stdout or "", error.stderr or "")
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()[-2000:]  # the end says why
        raise HostError(f"`{' '.join(map(str, args))}` failed ({result.returncode}): {output}")
    return result

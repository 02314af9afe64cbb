"""Each virtual Pi lives in its own network namespace, joined to the host by a veth pair.

Slot N gets 10.213.N.1 on the host side and 10.213.N.2 on the Pi's `eth0`, so addresses are
fixed and an inventory can name them.
"""

from __future__ import annotations

from pathlib import Path

from appliance.control.host import run

SUBNET_PREFIX = "10.213"
NETNS_DIR = Path("/run/netns")


def host_address(slot: int) -> str:
    return f"{SUBNET_PREFIX}.{slot}.1"


def pi_address(slot: int) -> str:
    return f"{SUBNET_PREFIX}.{slot}.2"


def create(name: str, slot: int) -> Path:
    """Create namespace `name` with the Pi's eth0 in it and its peer (also `name`) on the host."""
    run("ip", "netns", "add", name)
    run("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", name)
    run("ip", "addr", "add", f"{host_address(slot)}/24", "dev", name)
    run("ip", "link", "set", name, "up")
    run("ip", "-n", name, "link", "set", "lo", "up")
    run("ip", "-n", name, "addr", "add", f"{pi_address(slot)}/24", "dev", "eth0")
    run("ip", "-n", name, "link", "set", "eth0", "up")
    run("ip", "-n", name, "route", "add", "default", "via", host_address(slot))
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def remove(name: str) -> None:
    """Delete the namespace (which takes the Pi's eth0 and so the pair with it) and the link."""
    if exists(name):
        run("ip", "netns", "delete", name, check=False)
    if run("ip", "link", "show", name, check=False).returncode == 0:
        run("ip", "link", "delete", name, check=False)

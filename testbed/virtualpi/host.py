"""What the host must offer before a virtual Pi can start, and the helpers that talk to it.

Every check fails with `HostError` (the control machine's), whose message says what is missing
and how to get it, so a missing prerequisite stops start-up at once instead of surfacing later
as a hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from appliance.control.host import HostError, run

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_REGISTRATION = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
# Which qemu binary the registration holds open (F flag): the file's identity when registered.
BINFMT_STAMP = Path("/run/virtual-pi-binfmt.json")
NSPAWN_RUNTIME = Path("/run/systemd/nspawn")
# Trixie's systemd 257 starts every service through systemd-executor, which qemu-user before 10
# cannot spawn ("Failed to spawn executor: Invalid argument").
QEMU_MINIMUM = (10, 0)

# Command → the Debian package that provides it.
REQUIRED_COMMANDS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "qemu-aarch64-static": "qemu-user-static",
    "ip": "iproute2",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "openssl": "openssl",  # hashes pi's password for cloud-init
    "tar": "tar",
}


def state_dir() -> Path:
    """Where each instance keeps its disk, keys and writable layer across restarts."""
    return Path(os.environ.get("VIRTUAL_PI_STATE", "/var/lib/virtual-pi"))


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostError(
            "a virtual Pi needs root (network namespaces, loop devices, mounts): run it with sudo"
        )


def require_commands(commands: dict[str, str] = REQUIRED_COMMANDS) -> None:
    missing = {
        command: package for command, package in commands.items() if not shutil.which(command)
    }
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise HostError(
            f"missing command(s) {', '.join(sorted(missing))}: apt-get install {packages}"
        )


def qemu_registration() -> str:
    """Debian's qemu-aarch64 registration with the flags a booted system needs.

    F (fix binary): the kernel opens qemu when registering, so binaries inside the container's
    root run without a qemu of their own. C (credentials): set-uid binaries such as sudo get
    their privileges from the binary, not from qemu; without it `sudo` fails inside the Pi.
    """
    if not QEMU_REGISTRATION.exists():
        raise HostError(f"{QEMU_REGISTRATION} is missing: apt-get install qemu-user-static")
    fields = QEMU_REGISTRATION.read_text().strip().split(":")
    fields[-1] = "POCF"
    return ":".join(fields)


def ensure_binfmt() -> None:
    """Make the kernel run arm64 binaries through qemu-aarch64-static (see qemu_registration)."""
    if not (BINFMT_DIR / "register").exists():
        result = run("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR, check=False)
        if result.returncode != 0:
            raise HostError(
                "binfmt_misc is not available, so arm64 binaries cannot run here: "
                f"`mount -t binfmt_misc binfmt_misc {BINFMT_DIR}` failed: {result.stderr.strip()}"
            )
    entry = BINFMT_DIR / "qemu-aarch64"
    registration = qemu_registration()
    wanted = set(registration.rsplit(":", 1)[1])
    interpreter = Path(registration.split(":")[-2]).resolve()
    identity = json.dumps([str(interpreter), *_file_identity(interpreter)])
    if entry.exists():
        status = entry.read_text()
        flags = next(line for line in status.splitlines() if line.startswith("flags:"))
        # An upgraded qemu is a new file: a registration made before holds the old one open.
        same_binary = BINFMT_STAMP.exists() and BINFMT_STAMP.read_text() == identity
        if (status.startswith("enabled") and wanted <= set(flags.partition(":")[2].strip())
                and same_binary):
            return
    try:
        if entry.exists():
            entry.write_text("-1")  # replace a registration without the flags or binary we need
        (BINFMT_DIR / "register").write_text(registration)
    except OSError as error:
        raise HostError(f"could not register qemu-aarch64 with binfmt_misc: {error}") from error
    BINFMT_STAMP.write_text(identity)


def _file_identity(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def require_qemu_version() -> None:
    output = run("qemu-aarch64-static", "--version").stdout
    match = re.search(r"version (\d+)\.(\d+)", output)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if version < QEMU_MINIMUM:
        raise HostError(
            f"qemu-user-static {'.'.join(map(str, version))} cannot boot Trixie's systemd (it "
            f"cannot spawn systemd-executor); {'.'.join(map(str, QEMU_MINIMUM))} or later is "
            "needed: on Debian 12 from bookworm-backports, which scripts/install-debian-packages "
            "installs"
        )


def ensure_loop_devices() -> None:
    if not Path("/dev/loop-control").exists():
        raise HostError("no loop devices (/dev/loop-control is missing): modprobe loop")


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` is on (the longest mount point that contains it)."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount_point, kind = line.split()[1:3]
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, kind
    return fstype


def ensure_nspawn_runtime() -> None:
    """systemd-nspawn keeps per-container state there and needs it on a tmpfs (as /run is on a
    systemd host; on this kind of sandbox it is not, so one is mounted)."""
    if _filesystem_type(NSPAWN_RUNTIME) != "tmpfs":
        NSPAWN_RUNTIME.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", NSPAWN_RUNTIME)


def preflight() -> None:
    """Everything a virtual Pi needs from the host, checked in the order a person would fix it."""
    require_root()
    require_commands()
    require_qemu_version()
    ensure_binfmt()
    ensure_loop_devices()
    ensure_nspawn_runtime()

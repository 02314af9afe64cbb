"""The virtual Pi's root filesystem: Debian 12 arm64 from debootstrap, cached as a tarball.

The recipe is data. Its digest names the tarball, so the ~5 minute debootstrap runs again only
when the recipe changes; the tarball is unpacked once into a read-only base that every instance
mounts under its own writable overlay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from appliance.control.host import cache_dir, run

# Raspberry Pi OS Lite (Bookworm) ships these; the playbook may rely on them being there.
PACKAGES = [
    "ca-certificates", "curl", "dbus", "e2fsprogs", "fdisk", "iproute2", "kmod", "less",
    "openssh-server", "parted", "procps", "python3", "python3-apt", "python3-venv", "sudo",
    "systemd", "systemd-sysv",
]

# Pi OS's default /boot/firmware/config.txt (the lines the playbook's firmware settings touch).
CONFIG_TXT = """\
# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Automatically load overlays for detected DSI displays
display_auto_detect=1

# Automatically load initramfs files, if found
auto_initramfs=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Don't have the firmware create an initial video= setting in cmdline.txt.
# Use the kernel's default instead.
disable_fw_kms_setup=1

# Run in 64-bit mode
arm_64bit=1

# Disable compensation for displays with overscan
disable_overscan=1

# Run as fast as firmware / board allows
arm_boost=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
# This line should be removed if the legacy DWC2 controller is required
# (e.g. for USB device mode) or if USB support is not required.
otg_mode=1

[cm5]
dtoverlay=dwc2,dr_mode=host

[all]
"""

# Every program in the virtual Pi runs under qemu; QEMU_CPU makes qemu refuse what a Cortex-A76
# lacks (i8mm, SVE, SME), as the real CPU would. PID 1 gets it from nspawn, services from
# DefaultEnvironment, SSH sessions from /etc/environment (pam_env).
QEMU_CPU = "cortex-a76"

# qemu-user cannot emulate clone() with namespace flags, which systemd uses to set up
# LoadCredential= for a service, so a unit with credentials fails under emulation (status 243).
# A real Pi has no such limit; these OS units get their (optional, unused) credentials dropped.
UNITS_WITH_OPTIONAL_CREDENTIALS = [
    "procps", "systemd-firstboot", "systemd-sysctl", "systemd-sysusers", "systemd-tmpfiles-clean",
    "systemd-tmpfiles-setup-dev", "systemd-tmpfiles-setup",
]
NO_CREDENTIALS_DROP_IN = (
    "# Emulation gap: see testbed/virtualpi/rootfs.py.\n[Service]\nLoadCredential=\n"
)

# nspawn cannot bind over /proc itself, so the Pi 5's cpuinfo (bound by nspawn under
# /run/virtual-pi) is mounted over /proc/cpuinfo early in boot.
BOARD_UNIT = """\
[Unit]
Description=Raspberry Pi 5 board facts of the virtual Pi
DefaultDependencies=no
Before=sysinit.target
ConditionPathExists=/run/virtual-pi/cpuinfo

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --bind /run/virtual-pi/cpuinfo /proc/cpuinfo

[Install]
WantedBy=sysinit.target
"""

FILES = {
    **{
        f"etc/systemd/system/{unit}.service.d/10-virtual-pi-no-credentials.conf":
            NO_CREDENTIALS_DROP_IN
        for unit in UNITS_WITH_OPTIONAL_CREDENTIALS
    },
    "etc/systemd/system/virtual-pi-board.service": BOARD_UNIT,
    "boot/firmware/config.txt": CONFIG_TXT,
    "etc/environment": f"QEMU_CPU={QEMU_CPU}\n",
    "etc/systemd/system.conf.d/10-virtual-pi.conf": (
        f"[Manager]\nDefaultEnvironment=QEMU_CPU={QEMU_CPU}\n"
    ),
    "etc/sudoers.d/010_pi-nopasswd": "pi ALL=(ALL) NOPASSWD: ALL\n",
    "etc/ssh/sshd_config.d/10-virtual-pi.conf": (
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n"
    ),
    "etc/fstab": "# the virtual Pi's filesystems are mounted by systemd-nspawn\n",
    "etc/hostname": "raspberrypi\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
}

# Run inside the new root (under emulation) after the files are written.
COMMANDS = [
    ["systemctl", "enable", "virtual-pi-board.service"],
    ["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "pi"],
    ["chmod", "0440", "/etc/sudoers.d/010_pi-nopasswd"],
    # Host keys are made per instance; an image must not carry one shared key.
    ["sh", "-c", "rm -f /etc/ssh/ssh_host_*"],
    # No machine-id in the image: each instance gets its own.
    ["sh", "-c", ": > /etc/machine-id"],
    ["apt-get", "clean"],
]

RECIPE = {
    "suite": "bookworm",
    "arch": "arm64",
    "variant": "minbase",
    "mirror": "http://deb.debian.org/debian",
    "packages": PACKAGES,
    "files": FILES,
    "commands": COMMANDS,
}


def recipe_digest(recipe: dict = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def images_dir() -> Path:
    return cache_dir() / "virtual-pi"


@contextmanager
def _build_lock():
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"virtual-pi: {message}", file=sys.stderr, flush=True)


def tarball_path() -> Path:
    return images_dir() / f"rootfs-{RECIPE['suite']}-{RECIPE['arch']}-{recipe_digest()}.tar.gz"


def _remove_build_tree(work: Path) -> None:
    """Remove a (possibly interrupted) debootstrap tree, unmounting what it left mounted first:
    an rmtree through a bind-mounted /dev or /proc would reach the host's."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount_point in sorted(mounts, reverse=True):
        if mount_point.startswith(f"{work}/"):
            run("umount", "--lazy", mount_point, check=False)
    shutil.rmtree(work, ignore_errors=True)


def _build_tarball(target: Path) -> None:
    work = target.with_suffix(".build")
    _remove_build_tree(work)
    started = time.monotonic()
    _log(f"building the arm64 root filesystem with debootstrap (about 5 minutes) → {target}")
    try:
        run(
            "debootstrap", f"--arch={RECIPE['arch']}", f"--variant={RECIPE['variant']}",
            f"--include={','.join(RECIPE['packages'])}",
            RECIPE["suite"], work, RECIPE["mirror"],
        )
        for relative, content in RECIPE["files"].items():
            path = work / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        for command in RECIPE["commands"]:
            run("chroot", work, *command)
        partial = target.with_name(target.name + ".partial")
        run("tar", "--numeric-owner", "--xattrs", "-I", "gzip -1", "-cf", partial, "-C", work, ".")
        partial.rename(target)
    finally:
        _remove_build_tree(work)
    _log(f"root filesystem built in {time.monotonic() - started:.0f} s")


def ensure_base() -> Path:
    """The unpacked, read-only base tree for the current recipe (built and cached if needed)."""
    tarball = tarball_path()
    base = images_dir() / tarball.name.removesuffix(".tar.gz")
    with _build_lock():
        if base.is_dir():
            return base
        if not tarball.exists():
            _build_tarball(tarball)
        unpacking = base.with_name(base.name + ".unpacking")
        shutil.rmtree(unpacking, ignore_errors=True)
        unpacking.mkdir()
        run("tar", "--numeric-owner", "--xattrs", "-xzf", tarball, "-C", unpacking)
        unpacking.rename(base)
        _remove_stale(keep={tarball.name, base.name})
    return base


def _remove_stale(keep: set[str]) -> None:
    """Drop tarballs and trees of older recipes; only the current one is ever used."""
    mounts = Path("/proc/mounts").read_text()
    for entry in images_dir().glob("rootfs-*"):
        in_use = f"lowerdir={entry}," in mounts  # a running instance still boots from it
        building = entry.name.endswith((".build", ".partial"))
        if entry.name not in keep and not in_use and not building:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

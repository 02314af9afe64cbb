"""The virtual Pi's root filesystem: Debian 13 "Trixie" or Debian 12 "Bookworm" arm64 from
debootstrap (the bases of today's and the previous Raspberry Pi OS), cached as a tarball.

Each release's recipe is data. Its digest names the tarball, so the ~5 minute debootstrap runs
again only when the recipe changes; the tarball is unpacked once into a read-only base that every
instance of that release mounts under its own writable overlay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.control.host import cache_dir, run

# Raspberry Pi OS Lite ships these; the playbook may rely on them being there.
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

# qemu-user cannot emulate clone() with namespace flags, which systemd uses to set up a service's
# credentials (LoadCredential=, and ImportCredential= since systemd 254), so such a unit fails
# under emulation (status 243). A real Pi has no such limit; these OS units get their (optional,
# unused) credentials dropped.
UNITS_WITH_OPTIONAL_CREDENTIALS = [
    "procps", "systemd-firstboot", "systemd-sysctl", "systemd-sysusers", "systemd-tmpfiles-clean",
    "systemd-tmpfiles-setup-dev", "systemd-tmpfiles-setup",
]
# systemd 257 (Trixie) imports credentials into these too.
UNITS_IMPORTING_CREDENTIALS = [
    "autovt@", "console-getty", "container-getty@", "getty@", "serial-getty@",
    "systemd-journald", "systemd-network-generator", "systemd-tmpfiles-setup-dev-early",
]
NO_CREDENTIALS_DROP_IN = (
    "# Emulation gap: see testbed/virtualpi/rootfs.py.\n[Service]\nLoadCredential=\n"
)
NO_IMPORTED_CREDENTIALS_DROP_IN = NO_CREDENTIALS_DROP_IN + "ImportCredential=\n"
# systemd 257 also sets up a unit's mount namespace in such a clone() (status 226/NAMESPACE):
# Debian's units that sandbox their files run without one. logind matters most: pam_systemd
# waits for it at every login.
UNITS_WITH_MOUNT_NAMESPACES = [
    "systemd-hostnamed", "systemd-localed", "systemd-logind", "systemd-timedated",
    "systemd-timesyncd", "fstrim",
]
NO_MOUNT_NAMESPACE_DROP_IN = (
    "# Emulation gap: see testbed/virtualpi/rootfs.py.\n[Service]\n"
    + "".join(f"{setting}=no\n" for setting in (
        "PrivateTmp", "PrivateDevices", "ProtectSystem", "ProtectHome", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups"))
    + "ReadWritePaths=\nReadOnlyPaths=\nInaccessiblePaths=\n"
)


def _no_credentials(units: list[str], drop_in: str) -> dict[str, str]:
    return {f"etc/systemd/system/{unit}.service.d/10-virtual-pi-no-credentials.conf": drop_in
            for unit in units}


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

# Raspberry Pi OS Trixie's swap: rpi-swap, a generator reading /etc/rpi/swap.conf and then
# /etc/rpi/swap.conf.d/*.conf (a later file's key wins). It is not in Debian's archive, so this
# stand-in implements the part the swap role relies on: [Main] Mechanism=, [File] Path= and
# FixedSizeMiB=, [Zram] RamMultiplier= and FixedSizeMiB=. Its units carry
# ConditionVirtualization=!container: a container may not swapon, so they are generated, seen by
# systemd, and skipped.
RPI_SWAP_CONF = """\
# Swap configuration for rpi-swap: see swap.conf(5). Drop-ins go in /etc/rpi/swap.conf.d/.
[Main]
Mechanism=auto
"""
RPI_SWAP_GENERATOR = r"""#!/bin/sh
# Stand-in for Raspberry Pi OS's rpi-swap generator (see testbed/virtualpi/rootfs.py).
set -eu
out="${1:-/run/systemd/generator}"
value() {  # SECTION KEY DEFAULT: the last setting in swap.conf and its drop-ins, in name order
    found=$(cat /etc/rpi/swap.conf /etc/rpi/swap.conf.d/*.conf 2>/dev/null | awk \
        -v section="[$1]" -v key="$2" '
        /^[[:space:]]*[#;]/ { next }
        /^\[/ { current = $1; next }
        current == section && index($0, key "=") == 1 { found = substr($0, length(key) + 2) }
        END { print found }')
    echo "${found:-$3}"
}
mechanism=$(value Main Mechanism auto)
# auto: zram on an SD card, which is where the virtual Pi's root is.
[ "$mechanism" = auto ] && mechanism=zram
mkdir -p "$out/swap.target.wants"
case "$mechanism" in
*file*)
    path=$(value File Path /var/swap)
    unit=$(systemd-escape --path --suffix=swap "$path")
    printf '%s\n' "[Unit]" "Description=rpi-swap: swap file $path" \
        "ConditionVirtualization=!container" "[Swap]" "What=$path" > "$out/$unit"
    ln -sf "../$unit" "$out/swap.target.wants/$unit" ;;
esac
case "$mechanism" in
*zram*)
    size=$(value Zram FixedSizeMiB "")
    if [ -z "$size" ]; then
        multiplier=$(value Zram RamMultiplier 0.5)
        size=$(awk -v m="$multiplier" '/^MemTotal/ { print int($2 * m / 1024) }' /proc/meminfo)
    fi
    printf '%s\n' "[Unit]" "Description=rpi-swap: zram device ($size MiB)" \
        "ConditionVirtualization=!container" "DefaultDependencies=no" "[Service]" \
        "Type=oneshot" "RemainAfterExit=yes" "ExecStartPre=/sbin/modprobe zram" \
        "ExecStart=/sbin/zramctl /dev/zram0 --size ${size}M" \
        "ExecStart=/sbin/mkswap /dev/zram0" > "$out/rpi-zram-setup.service"
    printf '%s\n' "[Unit]" "Description=rpi-swap: compressed RAM" \
        "ConditionVirtualization=!container" "Requires=rpi-zram-setup.service" \
        "After=rpi-zram-setup.service" "[Swap]" "What=/dev/zram0" "Priority=100" \
        > "$out/dev-zram0.swap"
    ln -sf ../dev-zram0.swap "$out/swap.target.wants/dev-zram0.swap" ;;
esac
"""

# Raspberry Pi OS Trixie's first boot is cloud-init reading the NoCloud seed that Imager writes
# to the boot partition (rpi-cloud-init-mods points it there). The network is the testbed's.
CLOUD_INIT_CONFIG = """\
# virtual Pi: the seed on the boot partition, as Raspberry Pi OS reads it
datasource_list: [NoCloud, None]
datasource:
  NoCloud:
    seedfrom: file:///boot/firmware/
# virtual Pi: the network namespace is set up from the host
network:
  config: disabled
"""

COMMON_FILES = {
    "etc/systemd/system/virtual-pi-board.service": BOARD_UNIT,
    "boot/firmware/config.txt": CONFIG_TXT,
    "etc/environment": f"QEMU_CPU={QEMU_CPU}\n",
    "etc/systemd/system.conf.d/10-virtual-pi.conf": (
        f"[Manager]\nDefaultEnvironment=QEMU_CPU={QEMU_CPU}\n"
    ),
    "etc/ssh/sshd_config.d/10-virtual-pi.conf": (
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n"
    ),
    "etc/fstab": "# the virtual Pi's filesystems are mounted by systemd-nspawn\n",
    "etc/hostname": "raspberrypi\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
}

# Run inside the new root (under emulation) after the files are written.
ENABLE_BOARD_UNIT = ("systemctl", "enable", "virtual-pi-board.service")
COMMON_COMMANDS = [
    # Host keys are made per instance; an image must not carry one shared key.
    ["sh", "-c", "rm -f /etc/ssh/ssh_host_*"],
    # No machine-id in the image: each instance gets its own.
    ["sh", "-c", ": > /etc/machine-id"],
    ["apt-get", "clean"],
]


@dataclass(frozen=True)
class Release:
    """What one Raspberry Pi OS release is built from and how its first boot makes the user."""

    name: str
    suite: str
    packages: tuple[str, ...]
    files: dict[str, str]
    commands: tuple[tuple[str, ...], ...]
    # cloud-init makes the user `pi` from the seed on the boot partition; else the image has it.
    cloud_init: bool
    # Images of this release up to now: passwordless sudo, or sudo that asks for the password.
    default_sudo: str
    arch: str = "arm64"

    def recipe(self) -> dict:
        return {"suite": self.suite, "arch": self.arch, "variant": VARIANT, "mirror": MIRROR,
                "packages": sorted(self.packages), "files": self.files,
                "commands": [list(command) for command in self.commands]}


VARIANT, MIRROR = "minbase", "http://deb.debian.org/debian"

RELEASES = {
    # Raspberry Pi OS since 2025-10: Python 3.13, systemd 257, cloud-init, rpi-swap, and (since
    # 2026-04) sudo that asks for the password.
    "trixie": Release(
        name="trixie", suite="trixie", packages=tuple(PACKAGES),
        files={
            **COMMON_FILES,
            **_no_credentials(UNITS_WITH_OPTIONAL_CREDENTIALS + UNITS_IMPORTING_CREDENTIALS,
                              NO_IMPORTED_CREDENTIALS_DROP_IN),
            **{f"etc/systemd/system/{unit}.service.d/10-virtual-pi-no-mount-namespace.conf":
               NO_MOUNT_NAMESPACE_DROP_IN for unit in UNITS_WITH_MOUNT_NAMESPACES},
            "etc/cloud/cloud.cfg.d/99_virtual-pi.cfg": CLOUD_INIT_CONFIG,
            "etc/rpi/swap.conf": RPI_SWAP_CONF,
            "etc/rpi/swap.conf.d/.keep": "",
            "usr/lib/systemd/system-generators/rpi-swap-generator": RPI_SWAP_GENERATOR,
        },
        commands=(
            # By apt, not debootstrap's --include: its simple resolver configures cloud-init's
            # Python dependencies out of order.
            ("sh", "-c", "DEBIAN_FRONTEND=noninteractive apt-get install --yes --quiet "
                         "--no-install-recommends cloud-init"),
            ENABLE_BOARD_UNIT,
            ("chmod", "0755", "/usr/lib/systemd/system-generators/rpi-swap-generator"),
            *map(tuple, COMMON_COMMANDS),
        ),
        cloud_init=True, default_sudo="password",
    ),
    # Raspberry Pi OS until 2025-10: Python 3.11, systemd 252, the user made at image time,
    # passwordless sudo.
    "bookworm": Release(
        name="bookworm", suite="bookworm", packages=tuple(PACKAGES),
        files={
            **COMMON_FILES,
            **_no_credentials(UNITS_WITH_OPTIONAL_CREDENTIALS, NO_CREDENTIALS_DROP_IN),
            "etc/sudoers.d/010_pi-nopasswd": "pi ALL=(ALL) NOPASSWD: ALL\n",
        },
        commands=(
            ENABLE_BOARD_UNIT,
            ("useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "pi"),
            ("chmod", "0440", "/etc/sudoers.d/010_pi-nopasswd"),
            *map(tuple, COMMON_COMMANDS),
        ),
        cloud_init=False, default_sudo="nopasswd",
    ),
}
DEFAULT_RELEASE = "trixie"


def recipe_digest(release: Release) -> str:
    return hashlib.sha256(json.dumps(release.recipe(), sort_keys=True).encode()).hexdigest()[:16]


def images_dir() -> Path:
    return cache_dir() / "virtual-pi"


@contextmanager
def _build_lock(release: Release):
    """One build of a release at a time; other releases build beside it."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / f".{release.suite}-{release.arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"virtual-pi: {message}", file=sys.stderr, flush=True)


def tarball_path(release: Release) -> Path:
    return images_dir() / f"rootfs-{release.suite}-{release.arch}-{recipe_digest(release)}.tar.gz"


def _remove_build_tree(work: Path) -> None:
    """Remove a (possibly interrupted) debootstrap tree, unmounting what it left mounted first:
    an rmtree through a bind-mounted /dev or /proc would reach the host's."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount_point in sorted(mounts, reverse=True):
        if mount_point.startswith(f"{work}/"):
            run("umount", "--lazy", mount_point, check=False)
    shutil.rmtree(work, ignore_errors=True)


def _build_tarball(release: Release, target: Path) -> None:
    work = target.with_suffix(".build")
    _remove_build_tree(work)
    started = time.monotonic()
    _log(f"building the {release.name} {release.arch} root filesystem with debootstrap (minutes) "
         f"→ {target}")
    try:
        run(
            "debootstrap", f"--arch={release.arch}", f"--variant={VARIANT}",
            f"--include={','.join(sorted(release.packages))}", release.suite, work, MIRROR,
        )
        for relative, content in release.files.items():
            path = work / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        run("mount", "-t", "proc", "proc", work / "proc")  # for apt's maintainer scripts
        for command in release.commands:
            run("chroot", work, *command)
        run("umount", work / "proc")
        partial = target.with_name(target.name + ".partial")
        run("tar", "--numeric-owner", "--xattrs", "-I", "gzip -1", "-cf", partial, "-C", work, ".")
        partial.rename(target)
    finally:
        _remove_build_tree(work)
    _log(f"root filesystem built in {time.monotonic() - started:.0f} s")


def ensure_base(release: Release) -> Path:
    """The unpacked, read-only base tree of the release's recipe (built and cached if needed)."""
    tarball = tarball_path(release)
    base = images_dir() / tarball.name.removesuffix(".tar.gz")
    if base.is_dir():  # unpacked under the lock, renamed into place last: complete
        return base
    with _build_lock(release):
        if base.is_dir():
            return base
        if not tarball.exists():
            _build_tarball(release, tarball)
        unpacking = base.with_name(base.name + ".unpacking")
        shutil.rmtree(unpacking, ignore_errors=True)
        unpacking.mkdir()
        run("tar", "--numeric-owner", "--xattrs", "-xzf", tarball, "-C", unpacking)
        unpacking.rename(base)
        _remove_stale(release, keep={tarball.name, base.name})
    return base


def _remove_stale(release: Release, keep: set[str]) -> None:
    """Drop the release's tarballs and trees of older recipes; only the current one is used."""
    mounts = Path("/proc/mounts").read_text()
    for entry in images_dir().glob(f"rootfs-{release.suite}-{release.arch}-*"):
        in_use = f"lowerdir={entry}," in mounts  # a running instance still boots from it
        building = entry.name.endswith((".build", ".partial"))
        if entry.name not in keep and not in_use and not building:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

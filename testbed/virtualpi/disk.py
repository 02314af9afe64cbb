"""The virtual Pi's NVMe drive: a sparse image file on a loop device, shown as /dev/nvme0n1."""

from __future__ import annotations

from pathlib import Path

from appliance.control.host import HostError, run

# blank: a new drive; ext4: a drive that already holds data (the playbook must not wipe it);
# none: a Pi without the M.2 HAT.
KINDS = ("blank", "ext4", "none")
DEVICE = "/dev/nvme0n1"


def create_image(path: Path, kind: str, size_gib: int) -> None:
    if kind not in KINDS:
        raise HostError(f"unknown NVMe kind {kind!r}: choose one of {', '.join(KINDS)}")
    path.unlink(missing_ok=True)
    if kind == "none":
        return
    with open(path, "wb") as image:
        image.truncate(size_gib << 30)
    if kind == "ext4":
        run("mkfs.ext4", "-q", "-F", "-L", "existing-data", path)


def attach(image: Path) -> str:
    """Attach the image to a free loop device with partition scanning; return the device."""
    result = run("losetup", "--find", "--show", "--partscan", image, check=False)
    if result.returncode != 0:
        raise HostError(
            f"no free loop device for {image}: {result.stderr.strip()} "
            "(free some with `losetup -D`, or `modprobe loop max_loop=64`)"
        )
    return result.stdout.strip()


def attached_devices(image: Path) -> list[str]:
    """Every loop device backed by `image`, including ones a crashed run left behind."""
    output = run("losetup", "--associated", image, check=False).stdout
    return [line.split(":", 1)[0] for line in output.splitlines() if line.strip()]


def detach(image: Path) -> None:
    for device in attached_devices(image):
        run("losetup", "--detach", device, check=False)

"""Flashable images for field technicians: the base image checked before any work, and the built
image packaged for Raspberry Pi Imager and bmaptool.

A base is a Raspberry Pi OS Lite arm64 image as Raspberry Pi publishes it (pi-gen's layout): an
MBR partition table, partition 1 the FAT32 boot partition (`/boot/firmware`; Imager writes its
customisation there), partition 2 the ext4 root. Raspberry Pi OS's first boot grows partition 2
and gives the disk a new id only when root is partition 2 of an MBR disk, so a base that is
laid out otherwise is refused, as is one whose sha256 is not the one given.

What a build leaves (`pi-llm-appliance-<version>-<profile>.*`): the image compressed with xz,
its `.bmap` (made from the sparse raw image, before compression, as pi-gen does), a manifest
(JSON: what went into it), `SHA256SUMS`, and an Imager repository file (`os_list`, with
`file://` URLs so it works offline). Each file is written beside its final name and renamed
when complete: a build that fails half-way leaves nothing under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.exitcodes import ApplianceError, ExitCode
from appliance.util import sha256_of_file, write_atomically

SECTOR_BYTES = 512
MBR_SIGNATURE = b"\x55\xaa"
FAT_PARTITION_TYPES = {0x0B, 0x0C}  # FAT32 (CHS, LBA), as pi-gen's parted writes
LINUX_PARTITION_TYPE = 0x83
GPT_PROTECTIVE_TYPE = 0xEE
EXT4_MAGIC = 0xEF53
# The Pi 5's firmware, kernels and initramfs take about 100 MiB; pi-gen makes 512 MiB.
MIN_BOOT_BYTES = 128 * 2**20
MIN_ROOT_BYTES = 512 * 2**20
# Raspberry Pi Imager's tag for a Pi 5 running a 64-bit OS; its device list must be in a custom
# repository, or Imager shows no device to choose.
PI5_DEVICE = {"name": "Raspberry Pi 5", "tags": ["pi5-64bit"], "default": True,
              "description": "Raspberry Pi 5, 500 and Compute Module 5",
              "matching_type": "exclusive"}
# What Imager writes for its customisation (user, SSH key, Wi-Fi), by the base's release.
INIT_FORMATS = {"trixie": "cloudinit-rpi", "bookworm": "systemd"}
PROGRESS_SECONDS = 5.0
COPY_CHUNK_BYTES = 4 * 2**20


class ImageError(ApplianceError):
    """A base image that cannot be used, or a build step that failed: says which and why."""

    exit_code = ExitCode.MODEL_INVALID  # EX_DATAERR: the input is wrong


@dataclass(frozen=True)
class Partition:
    number: int
    type_id: int
    start_bytes: int
    size_bytes: int

    @property
    def end_bytes(self) -> int:
        return self.start_bytes + self.size_bytes


def read_partitions(image: Path) -> list[Partition]:
    """The MBR's primary partitions; ImageError when the file is not an MBR disk image."""
    size = image.stat().st_size
    with image.open("rb") as disk:
        mbr = disk.read(SECTOR_BYTES)
    if size < SECTOR_BYTES or size % SECTOR_BYTES or mbr[510:512] != MBR_SIGNATURE:
        raise ImageError(f"{image}: not a disk image (no MBR partition table); give the "
                         "uncompressed .img or the .img.xz Raspberry Pi publishes")
    partitions = []
    for number in range(1, 5):
        entry = mbr[446 + 16 * (number - 1): 446 + 16 * number]
        type_id = entry[4]
        start, count = struct.unpack("<II", entry[8:16])
        if type_id and count:
            partitions.append(Partition(number, type_id, start * SECTOR_BYTES,
                                        count * SECTOR_BYTES))
    return partitions


def _read_at(image: Path, offset: int, count: int) -> bytes:
    with image.open("rb") as disk:
        disk.seek(offset)
        return disk.read(count)


def check_layout(image: Path) -> tuple[Partition, Partition]:
    """(boot, root) of a raw base image laid out as Raspberry Pi OS lays its image out."""
    partitions = read_partitions(image)
    if any(part.type_id == GPT_PROTECTIVE_TYPE for part in partitions):
        raise ImageError(f"{image}: a GPT disk image; Raspberry Pi OS images are MBR (its "
                         "first boot resizes root only on an MBR disk)")
    numbers = {part.number: part for part in partitions}
    boot, root = numbers.get(1), numbers.get(2)
    if boot is None or boot.type_id not in FAT_PARTITION_TYPES:
        raise ImageError(f"{image}: partition 1 is not a FAT32 boot partition (type "
                         f"{boot.type_id:#04x})" if boot else f"{image}: no partition 1")
    if root is None or root.type_id != LINUX_PARTITION_TYPE:
        raise ImageError(f"{image}: partition 2 is not a Linux root partition" if root
                         else f"{image}: no partition 2 (the root filesystem)")
    size = image.stat().st_size
    for part in (boot, root):
        if part.end_bytes > size:
            raise ImageError(f"{image}: truncated: partition {part.number} ends at "
                             f"{part.end_bytes} bytes but the file has {size}; download the "
                             "image again")
    if boot.size_bytes < MIN_BOOT_BYTES or root.size_bytes < MIN_ROOT_BYTES:
        raise ImageError(f"{image}: too small for a Raspberry Pi OS image: boot partition "
                         f"{boot.size_bytes // 2**20} MiB (at least {MIN_BOOT_BYTES // 2**20}), "
                         f"root {root.size_bytes // 2**20} MiB (at least "
                         f"{MIN_ROOT_BYTES // 2**20})")
    boot_sector = _read_at(image, boot.start_bytes, SECTOR_BYTES)
    if boot_sector[510:512] != MBR_SIGNATURE or b"FAT" not in boot_sector[54:90]:
        raise ImageError(f"{image}: partition 1 holds no FAT filesystem")
    magic = struct.unpack("<H", _read_at(image, root.start_bytes + 1024 + 56, 2))[0]
    if magic != EXT4_MAGIC:
        raise ImageError(f"{image}: partition 2 holds no ext4 filesystem")
    return boot, root


def check_sha256(path: Path, expected: str, progress: Callable[[str], None]) -> None:
    """Refuse a base whose sha256 is not the one pinned, before anything else is done."""
    if not path.is_file():
        raise ImageError(f"{path}: no such file (the base image)", ExitCode.MODEL_MISSING)
    size, hashed, last = path.stat().st_size, 0, time.monotonic()

    def hashing(chunk: int) -> None:
        nonlocal hashed, last
        hashed += chunk
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            progress(f"sha256 of {path.name}: {hashed * 100 // max(size, 1)} %")

    actual = sha256_of_file(path, hashing)
    if actual != expected:
        raise ImageError(f"{path}: sha256 is {actual}, not the {expected} given: a different "
                         "or damaged download; fetch it again, or give the sha256 published "
                         "beside it")


# ---- packaging ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    """What names and describes a build."""

    profile: str
    base_release: str  # trixie or bookworm: the Imager customisation format follows it
    epoch: int  # SOURCE_DATE_EPOCH: the build's one time, so that its outputs can repeat

    @property
    def stem(self) -> str:
        return f"pi-llm-appliance-{__version__}-{self.profile}"

    @property
    def date(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.epoch))


def source_date_epoch() -> int:
    """$SOURCE_DATE_EPOCH (reproducible-builds.org), else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(time.time())
    if not value.isdigit():
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r}: must be seconds since 1970",
                         ExitCode.USAGE)
    return int(value)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def compress(raw: Path, target: Path, progress: Callable[[str], None]) -> None:
    """`raw` → `target` with xz (all cores), through `target.partial`; progress every 5 s."""
    partial = _partial(target)
    size, sent, last = raw.stat().st_size, 0, time.monotonic()
    with raw.open("rb") as source, partial.open("wb") as sink:
        xz = subprocess.Popen(["xz", "--compress", "--threads=0", "-6", "--stdout"],
                              stdin=subprocess.PIPE, stdout=sink)
        assert xz.stdin is not None
        try:
            while chunk := source.read(COPY_CHUNK_BYTES):
                xz.stdin.write(chunk)
                sent += len(chunk)
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    progress(f"compressing {raw.name}: {sent * 100 // max(size, 1)} %")
            xz.stdin.close()
        finally:
            if xz.wait() != 0:
                partial.unlink(missing_ok=True)
                raise ImageError(f"xz failed compressing {raw} (exit {xz.returncode})",
                                 ExitCode.INTERNAL)
    partial.replace(target)


def make_bmap(raw: Path, target: Path) -> None:
    """bmaptool's block map of the sparse raw image (which blocks hold data, with checksums)."""
    tool = shutil.which("bmaptool")
    if tool is None:
        raise ImageError("bmaptool is missing: apt-get install bmaptool (Debian 13) or "
                         "bmap-tools (Debian 12)", ExitCode.UNREACHABLE)
    partial = _partial(target)
    subprocess.run([tool, "create", "-o", str(partial), str(raw)], check=True,
                   capture_output=True)
    partial.replace(target)


def imager_entry(release: Release, image: Path, raw_size: int, raw_sha256: str,
                 image_sha256: str, bmap: Path, description: str) -> dict[str, Any]:
    """One `os_list` entry of Raspberry Pi Imager's repository format."""
    return {
        "name": f"pi-llm-appliance {__version__} ({release.profile})",
        "description": description,
        "icon": "",
        "url": image.resolve().as_uri(),
        "extract_size": raw_size,
        "extract_sha256": raw_sha256,
        "image_download_size": image.stat().st_size,
        "image_download_sha256": image_sha256,
        "release_date": release.date,
        "devices": list(PI5_DEVICE["tags"]),
        "init_format": INIT_FORMATS[release.base_release],
        "architecture": "armv8",
        "bmap_url": bmap.resolve().as_uri(),
        "website": "https://github.com/pi-llm-appliance",
    }


def package(raw: Path, out_dir: Path, release: Release, manifest: dict[str, Any],
            description: str, progress: Callable[[str], None]) -> dict[str, Path]:
    """Write the build's outputs into `out_dir` from the finished raw image; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = release.stem
    outputs = {"image": out_dir / f"{stem}.img.xz", "bmap": out_dir / f"{stem}.img.bmap",
               "manifest": out_dir / f"{stem}.manifest.json",
               "imager": out_dir / f"{stem}.rpi-imager-manifest",
               "sums": out_dir / "SHA256SUMS"}
    progress(f"block map of {raw.name}")
    make_bmap(raw, outputs["bmap"])
    progress(f"sha256 of {raw.name}")
    raw_sha256 = sha256_of_file(raw)
    compress(raw, outputs["image"], progress)
    image_sha256 = sha256_of_file(outputs["image"])
    manifest = {**manifest, "image": {"file": outputs["image"].name,
                                      "sha256": image_sha256,
                                      "size_bytes": outputs["image"].stat().st_size,
                                      "extract_sha256": raw_sha256,
                                      "extract_size_bytes": raw.stat().st_size}}
    _write_json(outputs["manifest"], manifest)
    entry = imager_entry(release, outputs["image"], raw.stat().st_size, raw_sha256,
                         image_sha256, outputs["bmap"], description)
    _write_json(outputs["imager"], {"imager": {"devices": [PI5_DEVICE]}, "os_list": [entry]})
    listed = [outputs[name] for name in ("image", "bmap", "manifest", "imager")]
    write_atomically(outputs["sums"], "".join(
        f"{image_sha256 if path == outputs['image'] else sha256_of_file(path)}  {path.name}\n"
        for path in listed).encode(), mode=0o644)
    return outputs


def _write_json(path: Path, document: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644)

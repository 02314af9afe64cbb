"""Flashable images: a base checked before any work (sha256, layout, size) and a build packaged
for Raspberry Pi Imager and bmaptool — the outputs checked against each other, and flashed with
the real `bmaptool copy` to a file that must equal the image."""

from __future__ import annotations

import json
import lzma
import subprocess
from pathlib import Path

import pytest

from appliance.control.images import (
    MIN_BOOT_BYTES,
    ImageError,
    Release,
    check_layout,
    check_sha256,
    package,
)
from appliance.util import sha256_of_file

MIB = 2**20
# Raspberry Pi Imager's os_list entry: the fields its schema requires, and those a customised,
# cached, bmap-flashed write uses.
IMAGER_FIELDS = {"name", "description", "icon", "url", "extract_size", "extract_sha256",
                 "image_download_size", "image_download_sha256", "release_date", "devices",
                 "init_format"}


def make_disk_image(path: Path, *, boot_mib: int = 136, root_mib: int = 560,
                    table: str = "dos", boot_type: str = "c") -> Path:
    """A disk image laid out as pi-gen lays Raspberry Pi OS out: MBR, a FAT32 `bootfs` at
    8 MiB, an ext4 `rootfs` after it (sparse, with a file in each)."""
    start = 8 * MIB
    path.write_bytes(b"")
    with path.open("r+b") as disk:
        # GPT keeps a copy of its table in the last sectors.
        disk.truncate(start + (boot_mib + root_mib + (table == "gpt")) * MIB)
    layout = (f"label: {table}\nstart={start // 512}, size={boot_mib * MIB // 512}, "
              f"type={boot_type}\nsize={root_mib * MIB // 512}, type=83\n")
    if table == "gpt":
        layout = layout.replace("type=c", "type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7") \
            .replace("type=83", "type=0FC63DAF-8483-4772-8E79-3D69D8E4DE47")
    subprocess.run(["sfdisk", "--quiet", str(path)], input=layout, text=True, check=True)
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "bootfs", f"--offset={start // 512}",
                    str(path), str(boot_mib * 1024)], check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-E",
                    f"offset={start + boot_mib * MIB}", str(path), f"{root_mib}M"],
                   check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> Path:
    return make_disk_image(tmp_path_factory.mktemp("base") / "base.img")


def test_a_base_laid_out_as_raspberry_pi_os_is_taken(base_image):
    boot, root = check_layout(base_image)
    assert (boot.number, root.number) == (1, 2)
    assert boot.start_bytes == 8 * MIB and root.start_bytes == boot.end_bytes


def test_a_base_with_another_sha256_is_refused_before_anything_else(base_image):
    wrong = "0" * 64
    with pytest.raises(ImageError, match=f"sha256 is {sha256_of_file(base_image)}, not the "
                                         f"{wrong} given: a different or damaged download"):
        check_sha256(base_image, wrong, print)
    check_sha256(base_image, sha256_of_file(base_image), print)


@pytest.mark.parametrize("damage, message", [
    ("random", "not a disk image"),
    ("truncated", "truncated: partition 2 ends at"),
    ("gpt", "a GPT disk image"),
    ("small", "too small for a Raspberry Pi OS image"),
    ("no-fat", "partition 1 is not a FAT32 boot partition"),
])
def test_a_bad_base_is_refused_with_what_is_wrong(tmp_path, base_image, damage, message):
    bad = tmp_path / "bad.img"
    if damage == "random":
        bad.write_bytes(bytes(range(256)) * 4096)
    elif damage == "truncated":
        with base_image.open("rb") as source:
            bad.write_bytes(source.read(300 * MIB))
    elif damage == "gpt":
        make_disk_image(bad, table="gpt")
    elif damage == "small":
        make_disk_image(bad, boot_mib=MIN_BOOT_BYTES // MIB // 2)
    else:
        make_disk_image(bad, boot_type="83")
    with pytest.raises(ImageError, match=message):
        check_layout(bad)


@pytest.fixture(scope="module")
def packaged(base_image, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("out")
    release = Release(profile="raspberry-pi-5-16gb", base_release="trixie", epoch=1796169600)
    manifest = {"appliance": "0.1.0", "profile": release.profile,
                "base": {"file": base_image.name, "sha256": sha256_of_file(base_image)}}
    return package(base_image, out, release, manifest, "A test build", print)


def test_the_outputs_are_named_for_the_version_and_profile_and_nothing_is_left_partial(
        packaged):
    out = packaged["image"].parent
    assert sorted(path.name for path in out.iterdir()) == sorted([
        "SHA256SUMS", "pi-llm-appliance-0.1.0-raspberry-pi-5-16gb.img.xz",
        "pi-llm-appliance-0.1.0-raspberry-pi-5-16gb.img.bmap",
        "pi-llm-appliance-0.1.0-raspberry-pi-5-16gb.manifest.json",
        "pi-llm-appliance-0.1.0-raspberry-pi-5-16gb.rpi-imager-manifest"])


def test_the_image_decompresses_to_the_raw_image(packaged, base_image):
    with lzma.open(packaged["image"]) as image:
        assert _sha256_stream(image) == sha256_of_file(base_image)


def _sha256_stream(stream) -> str:
    import hashlib

    digest = hashlib.sha256()
    while chunk := stream.read(4 * MIB):
        digest.update(chunk)
    return digest.hexdigest()


def test_sha256sums_checks_every_output(packaged):
    out = packaged["image"].parent
    checked = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out,
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count(": OK") == 4


def test_the_imager_repository_has_every_field_and_its_sizes_and_sums_match_the_files(
        packaged, base_image):
    repository = json.loads(packaged["imager"].read_text())
    assert repository["imager"]["devices"][0]["tags"] == ["pi5-64bit"]
    [entry] = repository["os_list"]
    assert entry.keys() >= IMAGER_FIELDS
    image = packaged["image"]
    assert entry["url"] == image.resolve().as_uri() and entry["url"].startswith("file:///")
    assert entry["image_download_size"] == image.stat().st_size
    assert entry["image_download_sha256"] == sha256_of_file(image)
    assert entry["extract_size"] == base_image.stat().st_size
    assert entry["extract_sha256"] == sha256_of_file(base_image)
    assert entry["devices"] == ["pi5-64bit"] and entry["init_format"] == "cloudinit-rpi"
    assert entry["release_date"] == "2026-12-02"  # SOURCE_DATE_EPOCH's day, not the build's
    manifest = json.loads(packaged["manifest"].read_text())
    assert manifest["image"]["sha256"] == entry["image_download_sha256"]
    assert manifest["base"]["sha256"] == sha256_of_file(base_image)


def test_bmaptool_flashes_the_image_to_a_copy_of_the_raw_image(packaged, base_image, tmp_path):
    card = tmp_path / "sdcard.img"
    card.write_bytes(b"")
    with card.open("r+b") as device:
        device.truncate(base_image.stat().st_size)
    flashed = subprocess.run(["bmaptool", "copy", "--bmap", str(packaged["bmap"]),
                              str(packaged["image"]), str(card)],
                             capture_output=True, text=True, check=False)
    assert flashed.returncode == 0, flashed.stderr
    assert sha256_of_file(card) == sha256_of_file(base_image)

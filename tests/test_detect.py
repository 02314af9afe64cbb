"""`pi-appliance hw`: the machine as the planner sees it, read from fixture boards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.detect import board_memory_bytes, detect
from appliance.profiles import load_profiles, match

A76 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
       "dcpop asimddp")
A72 = "fp asimd evtstrm crc32 cpuid"
GIB = 1 << 30


def make_board(root: Path, *, model: str, revision: int, part: str, features: str,
               mem_kib: int, storage_source: str) -> Path:
    """A board's /proc and /sys as the detector reads them."""
    base = root / "sys/firmware/devicetree/base"
    (base / "system").mkdir(parents=True)
    (base / "model").write_bytes(model.encode() + b"\0")
    (base / "system/linux,revision").write_bytes(revision.to_bytes(4, "big"))
    (root / "proc").mkdir()
    core = f"CPU part\t: {part}\nFeatures\t: {features}\n\n"
    (root / "proc/cpuinfo").write_text(
        "".join(f"processor\t: {n}\n{core}" for n in range(4)) + f"Revision\t: {revision:06x}\n")
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {mem_kib} kB\nMemAvailable:   {mem_kib // 2} kB\n"
        "SwapTotal:        524284 kB\nSwapFree:         524284 kB\n")
    (root / "proc/mounts").write_text(f"{storage_source} / ext4 rw,noatime 0 0\n"
                                      "/dev/mmcblk0p1 /boot/firmware vfat rw 0 0\n")
    return root


@pytest.fixture
def pi5_8gb(tmp_path: Path) -> Path:
    root = make_board(tmp_path / "pi5-8gb", model="Raspberry Pi 5 Model B Rev 1.0",
                      revision=0xD04170, part="0xd0b", features=A76, mem_kib=8_245_000,
                      storage_source="/dev/nvme0n1p2")
    (root / "sys/block/nvme0n1").mkdir(parents=True)
    (root / "sys/block/nvme0n1p2").mkdir()  # a partition is not a drive
    return root


@pytest.fixture
def pi5_16gb(tmp_path: Path) -> Path:
    root = make_board(tmp_path / "pi5-16gb", model="Raspberry Pi 5 Model B Rev 1.1",
                      revision=0xE04171, part="0xd0b", features=A76, mem_kib=16_528_000,
                      storage_source="/dev/mmcblk0p2")
    # A service limited to 12 GiB (MemoryMax=) must plan with 12 GiB.
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/memory.max").write_text(f"{12 * GIB}\n")
    return root


@pytest.fixture
def pi4(tmp_path: Path) -> Path:
    return make_board(tmp_path / "pi4", model="Raspberry Pi 4 Model B Rev 1.4",
                      revision=0xC03114, part="0xd08", features=A72, mem_kib=3_884_000,
                      storage_source="/dev/mmcblk0p2")


def test_a_pi5_8gb_on_nvme(pi5_8gb, tmp_path):
    report = detect(pi5_8gb, {"state": tmp_path})
    assert report["board"] == {"model": "Raspberry Pi 5 Model B Rev 1.0", "revision": "d04170",
                               "memory_bytes": 8 * GIB}
    assert report["cpu"]["model"] == "Cortex-A76"
    assert report["cpu"]["logical_cores"] == report["cpu"]["physical_cores"] == 4
    assert {"asimd", "asimddp", "fphp"} <= set(report["cpu"]["features"])
    assert "i8mm" not in report["cpu"]["features"]
    assert report["storage"]["nvme_drives"] == ["nvme0n1"]
    state = report["storage"]["directories"]["state"]
    assert (state["source"], state["medium"], state["fstype"]) == ("/dev/nvme0n1p2", "nvme", "ext4")
    assert state["free_bytes"] > 0
    assert report["memory"]["total_bytes"] == 8_245_000 * 1024
    assert report["memory"]["swap_total_bytes"] == 524_284 * 1024


def test_a_pi5_16gb_on_sd_with_a_memory_limit(pi5_16gb, tmp_path):
    report = detect(pi5_16gb, {"models": tmp_path / "models" / "not-yet"})
    assert report["board"]["memory_bytes"] == 16 * GIB
    assert report["memory"]["usable_bytes"] == 12 * GIB  # the cgroup limit, not MemTotal
    assert report["storage"]["nvme_drives"] == []
    models = report["storage"]["directories"]["models"]
    assert models["medium"] == "sd"
    assert models["free_bytes"] > 0  # measured on the nearest directory that exists


def test_a_pi4_has_no_dot_product(pi4):
    report = detect(pi4)
    assert report["board"]["memory_bytes"] == 4 * GIB
    assert report["cpu"]["model"] == "Cortex-A72"
    assert "asimddp" not in report["cpu"]["features"]


def test_off_a_pi_nothing_is_invented(tmp_path):
    report = detect(tmp_path)
    assert report["board"] == {"model": None, "revision": None, "memory_bytes": None}
    assert report["memory"]["total_bytes"] is None
    assert report["soc_temperature_celsius"] is None and report["throttle"] is None


@pytest.mark.parametrize(("revision", "memory"), [
    (0xB04170, 2 * GIB), (0xC04170, 4 * GIB), (0xD04170, 8 * GIB), (0xE04171, 16 * GIB),
    (0x000E, None),  # an old-style code says nothing about RAM
])
def test_ram_from_the_revision_code(revision, memory):
    assert board_memory_bytes(revision) == memory


def test_hw_command_prints_a_summary_and_json(capsys, pi5_8gb, tmp_path):
    assert main(["hw", "--root", str(pi5_8gb), "--state-dir", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    assert "Raspberry Pi 5 Model B Rev 1.0 (revision d04170, 8.0 GiB)" in summary
    assert "Cortex-A76: " in summary and "asimddp" in summary and "nvme0n1" in summary
    assert "profile  raspberry-pi-5-8gb" in summary
    assert main(["hw", "--root", str(pi5_8gb), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu"]["model"] == "Cortex-A76"


def test_every_profile_loads_with_its_facts():
    profiles = load_profiles()
    pi5 = profiles["raspberry-pi-5-16gb"]
    assert (pi5.cpu, pi5.cores, pi5.memory_bytes) == ("Cortex-A76", 4, 16 * GIB)
    assert pi5.theoretical_bandwidth_bytes_per_s == 17.07e9
    assert "asimddp" in pi5.features and "i8mm" not in pi5.features
    assert profiles["raspberry-pi-cm5-8gb"].expected_bandwidth_bytes_per_s == 14.0e9
    assert "asimddp" not in profiles["raspberry-pi-4-4gb"].features
    assert profiles["generic-x86_64"].expected_bandwidth_bytes_per_s is None  # must be measured
    assert all(profile.source for profile in profiles.values())


@pytest.mark.parametrize(("board", "profile"), [
    ("pi5_8gb", "raspberry-pi-5-8gb"), ("pi5_16gb", "raspberry-pi-5-16gb"),
    ("pi4", "raspberry-pi-4-4gb"),
])
def test_a_detected_board_matches_its_profile(request, board, profile):
    report = detect(request.getfixturevalue(board))
    assert match(report).key == profile


def test_an_unknown_machine_gets_the_generic_profile_of_its_architecture(tmp_path):
    report = detect(tmp_path)
    assert match(report, architecture="x86_64").key == "generic-x86_64"
    assert match(report, architecture="aarch64").key == "generic-arm64"

"""`pi-appliance hw`: the machine as the planner sees it, read from fixture boards."""

from __future__ import annotations

import json

import pytest

from appliance.cli import main
from appliance.hardware.detect import board_memory_bytes, detect
from appliance.hardware.profiles import load_profiles, match
from tests.helpers import GIB


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

"""The shipped systemd unit: valid, hardened, and restart-aware."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from appliance.exitcodes import PERMANENT_FAILURES

UNIT_NAME = "pi-llm-appliance.service"
VERIFY_UNITS = ("pi-llm-appliance-verify.service", "pi-llm-appliance-verify.timer")
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def installed(tmp_path: Path, name: str) -> Path:
    """A shipped unit with ExecStart pointed at a binary that exists here (verify checks it)."""
    text = (resources.files("appliance") / "data" / name).read_text()
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    return installed(tmp_path, UNIT_NAME)


def analyze_verify(*units: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=60)
    names = [unit.name for unit in units]
    problems = [line for line in result.stderr.splitlines()
                if any(name in line for name in names) and "Failed to" not in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_unit_passes_systemd_analyze_verify(unit):
    analyze_verify(unit)


def test_verify_unit_and_timer_pass_systemd_analyze_verify(unit, tmp_path):
    verify_unit, timer = (installed(tmp_path, name) for name in VERIFY_UNITS)
    analyze_verify(unit, verify_unit, timer)
    text = verify_unit.read_text()
    # Runs after the service is up, as the same (dynamic) user, so it shares the state dir.
    assert re.search(r"^After=pi-llm-appliance\.service$", text, re.M)
    assert re.search(r"^Requires=pi-llm-appliance\.service$", text, re.M)
    user = re.compile(r"^User=(\S+)$", re.M)
    assert user.search(text).group(1) == user.search(unit.read_text()).group(1)
    # Below target is a verdict for /health, not a failed unit.
    assert re.search(r"^SuccessExitStatus=1$", text, re.M)


def test_verify_unit_exposure_is_at_most_2(tmp_path):
    verify_unit = installed(tmp_path, VERIFY_UNITS[0])
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(verify_unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_exposure_is_at_most_2(unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true",
                             f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_permanent_failures_are_not_restarted(unit):
    text = unit.read_text()
    listed = re.search(r"^RestartPreventExitStatus=(.*)$", text, re.M).group(1).split()
    assert sorted(map(int, listed)) == sorted(int(code) for code in PERMANENT_FAILURES)
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^WatchdogSec=\d+", text, re.M)

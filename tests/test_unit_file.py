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
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it)."""
    text = (resources.files("appliance") / "data" / UNIT_NAME).read_text()
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.M)
    path = tmp_path / UNIT_NAME
    path.write_text(text)
    return path


def test_unit_passes_systemd_analyze_verify(unit):
    result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines()
                if UNIT_NAME in line and "Failed to" not in line]
    assert result.returncode == 0 and not problems, result.stderr


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

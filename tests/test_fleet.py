"""`pi-appliance fleet` against real SSH: an sshd on loopback standing in for the Pis' (one daemon,
several inventory hosts, each with its own running appliance), fabric through it, and the
appliances' own /health."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, http_json, run_fleet, write_appliances_inventory

pytestmark = pytest.mark.slow


@pytest.fixture
def sshd(tmp_path: Path):
    """A real sshd on a loopback port that takes one key for root; its host key is in
    `known_hosts` (as `ssh-keyscan` after checking the fingerprint would put it)."""
    directory = tmp_path / "sshd"
    directory.mkdir(mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", directory / "host"],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", directory / "client"],
                   check=True)
    (directory / "authorized_keys").write_text((directory / "client.pub").read_text())
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host'}\n"
                      f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
                      "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                      "StrictModes no\nUsePAM no\nPidFile none\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation
    with (directory / "log").open("wb") as log:
        daemon = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", config], stderr=log)
    host_key = (directory / "host.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (directory / "empty_known_hosts").write_text("")
    deadline = time.monotonic() + 20
    while subprocess.run(["ssh-keyscan", "-p", str(port), "127.0.0.1"], capture_output=True,
                         check=False).returncode != 0:
        assert time.monotonic() < deadline and daemon.poll() is None, \
            (directory / "log").read_text()
        time.sleep(0.2)
    yield {"port": port, "key": directory / "client", "known_hosts": directory / "known_hosts",
           "empty_known_hosts": directory / "empty_known_hosts"}
    daemon.terminate()
    daemon.wait(10)


def ssh_vars(sshd: dict, known_hosts: Path | None = None) -> dict:
    return {"ansible_host": "127.0.0.1", "ansible_port": sshd["port"], "ansible_user": "root",
            "ansible_ssh_private_key_file": str(sshd["key"]),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts or sshd['known_hosts']}"
                                       " -o StrictHostKeyChecking=yes"}


@pytest.fixture
def five_hosts(sshd, start_server, tmp_path, pi5_root):
    """Five hosts: healthy; verified below target (degraded); throttled and hot; its Pi
    unreachable; and one whose host key nobody has checked."""
    healthy = start_server()
    (tmp_path / "slow").mkdir()  # each Pi its own state: the verdict is pi-slow's alone
    slow = start_server(verify={"enabled": True, "by": "unit"},
                        paths={"state_dir": str(tmp_path / "slow")})
    throttled = start_server(paths={"hardware_root": str(pi5_root)})
    for server in (healthy, throttled):
        server.wait_ready()
    instance = None
    deadline = time.monotonic() + 60
    while instance is None and time.monotonic() < deadline:
        try:
            body = http_json(slow.url + "/health", timeout=2)[1]
            instance = body["instance_id"] if body.get("status") == "verifying" else None
        except OSError:
            time.sleep(0.2)
    assert instance, slow.output()
    (tmp_path / "slow" / "verify.json").write_text(json.dumps({
        "result": "fail", "reason": "measured 5.10 tok/s, below the target 8.00 × 0.95",
        "instance_id": instance, "measured_tps": 5.1, "depth": 0, "target_tps": 8.0,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    closed = free_port()  # nothing listens there
    return write_appliances_inventory(tmp_path / "hosts.yml", {
        "pi-ok": {**ssh_vars(sshd), "service_port": healthy.port},
        "pi-slow": {**ssh_vars(sshd), "service_port": slow.port},
        "pi-hot": {**ssh_vars(sshd), "service_port": throttled.port},
        "pi-off": {**ssh_vars(sshd), "ansible_port": closed, "service_port": 8080},
        "pi-new": {**ssh_vars(sshd, sshd["empty_known_hosts"]), "service_port": healthy.port},
    })


def test_status_shows_each_host_and_its_problems_and_fails_unless_all_are_healthy(five_hosts):
    result = run_fleet("status", "-i", str(five_hosts), "--json", "--timeout", "5")
    assert result.returncode == 1, result.stderr
    rows = {row["host"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["pi-ok", "pi-slow", "pi-hot", "pi-off", "pi-new"]  # the inventory's
    ok = rows["pi-ok"]
    assert ok["healthy"] and ok["status"] == "ok" and ok["problems"] == []
    assert ok["model"] == "SmolLM2-135M-Instruct.Q4_1" and ok["verified_tps"] is None
    assert ok["uptime_seconds"] > 0 and ok["disk_free_bytes"] > 0
    slow = rows["pi-slow"]
    assert slow["status"] == "degraded" and (slow["verified_tps"], slow["target_tps"]) == (5.1, 8)
    assert slow["problems"] == ["status degraded: measured 5.10 tok/s, below the target "
                                "8.00 × 0.95"]
    hot = rows["pi-hot"]
    assert hot["status"] == "ok" and hot["soc_temperature_celsius"] == 81.25
    assert hot["problems"] == ["throttled now: arm_frequency_capped, throttled", "SoC at 81.25 °C"]
    off = rows["pi-off"]
    assert not off["reachable"] and off["problems"][0].startswith("unreachable: cannot connect")
    new = rows["pi-new"]
    assert not new["reachable"]
    assert "its host key is not in" in new["problems"][0]  # refused, never trusted silently

    table = run_fleet("status", "-i", str(five_hosts), "--timeout", "5")
    print(table.stdout)  # the README's example
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["host", "status", "model"]
    assert lines[1].startswith("  pi-ok ") and lines[2].startswith("! pi-slow ")
    assert lines[-1] == "1 of 5 healthy"

    limited = run_fleet("status", "-i", str(five_hosts), "--limit", "pi-ok", "--csv")
    assert limited.returncode == 0, limited.stdout + limited.stderr
    header, row = limited.stdout.splitlines()
    assert header.startswith("host,reachable,status,model,verified_tps")
    assert row.startswith("pi-ok,True,ok,SmolLM2-135M-Instruct.Q4_1,")


def test_logs_of_a_host_that_cannot_be_reached_say_so(five_hosts):
    result = run_fleet("logs", "-i", str(five_hosts), "pi-off", "--timeout", "5")
    assert result.returncode == 69
    assert "pi-off: cannot connect to 127.0.0.1" in result.stderr
    several = run_fleet("logs", "-i", str(five_hosts), "pi-o*")
    assert several.returncode == 64 and "names 2 hosts (pi-ok, pi-off)" in several.stderr

"""`pi-appliance fleet` against real SSH: an sshd on loopback standing in for the Pis' (one daemon,
several inventory hosts, each with its own running appliance), fabric through it, and the
appliances' own /health."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import layout
from tests.helpers import (
    SMOLLM2_SHA256,
    free_port,
    http_json,
    run_fleet,
    write_appliances_inventory,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def sshd(tmp_path: Path):
    """A real sshd on a loopback port that takes one key for root; its host key is in
    `known_hosts` (as `ssh-keyscan` after checking the fingerprint would put it). What it runs
    sees a Pi's layout, in a mount namespace of its own (overlays on /opt and /var/lib): the
    appliance's command (this checkout's) and an empty model store under `store`."""
    directory = tmp_path / "sshd"
    directory.mkdir(mode=0o700)
    overlays = []
    for lower, inside in (("/opt", layout.VENV.parent), ("/var/lib", layout.MODELS_DIR)):
        upper = directory / lower.strip("/").replace("/", "-")
        (upper / inside.relative_to(lower)).mkdir(parents=True)
        (directory / f"{upper.name}-work").mkdir()
        overlays.append(f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},"
                        f"workdir={directory / f'{upper.name}-work'} {lower}")
    (directory / "opt" / layout.VENV.relative_to("/opt")).symlink_to(Path(sys.prefix))
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
        daemon = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             " && ".join([*overlays, f"exec /usr/sbin/sshd -D -e -f {config}"])], stderr=log)
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
           "empty_known_hosts": directory / "empty_known_hosts",
           "store": directory / "var-lib" / layout.MODELS_DIR.relative_to("/var/lib")}
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


@pytest.fixture
def store_host(sshd, tmp_path):
    """A reachable host with the Pi's layout and an empty store, and an unreachable one."""
    return write_appliances_inventory(tmp_path / "store-hosts.yml", {
        "pi-store": ssh_vars(sshd),
        "pi-off": {**ssh_vars(sshd), "ansible_port": free_port()},
    }), sshd["store"]


def test_push_model_resumes_a_cut_transfer_and_installs_as_model_install_does(store_host,
                                                                              model_path):
    inventory, store = store_host
    partial = store / ".partial" / f"{SMOLLM2_SHA256}.part"
    size = model_path.stat().st_size
    # A transfer at 20 MB/s, cut (its process killed) once part of the model is on the Pi.
    cut = subprocess.Popen([sys.executable, "-m", "appliance.cli", "fleet", "push-model",
                            str(model_path), "-i", str(inventory), "--hosts", "pi-store",
                            "--no-activate", "--bwlimit", "20"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 10_000_000):
        assert time.monotonic() < deadline and cut.poll() is None, cut.communicate()
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.communicate(timeout=10)
    time.sleep(1)  # the Pi's side sees the end of its input and keeps what it wrote
    held = partial.stat().st_size
    assert 10_000_000 < held < size

    resumed = run_fleet("push-model", str(model_path), "-i", str(inventory), "--hosts",
                        "pi-store", "--no-activate", "--sha256", SMOLLM2_SHA256)
    print(resumed.stdout)  # the README's example
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"pi-store: resuming at {held / 1e6:.1f} MB" in resumed.stderr
    assert resumed.stdout.splitlines()[-3].split() == [
        "pi-store", "resumed", "no", "-", f"{(size - held) / 1e6:.1f}", "MB", "(from",
        f"{held / 1e6:.1f}", "MB)", "-"]
    assert (store / f"{SMOLLM2_SHA256}.gguf").read_bytes() == model_path.read_bytes()
    record = json.loads((store / f"{SMOLLM2_SHA256}.json").read_text())
    assert record["verified"] == "sha256" and record["source"].startswith("pushed over SSH")
    assert not partial.exists() and not (store / "active").exists()  # --no-activate

    again = run_fleet("push-model", str(model_path), "-i", str(inventory), "--hosts", "all",
                      "--no-activate", "--json")
    assert again.returncode == 1, again.stderr  # pi-off is down
    rows = {row["host"]: row for row in json.loads(again.stdout)}
    assert rows["pi-store"]["healthy"] and rows["pi-store"]["sent_bytes"] == 0
    assert rows["pi-store"]["result"] == "already installed"
    assert rows["pi-off"]["problems"][0].startswith("unreachable: cannot connect")


def test_push_model_refuses_a_file_that_is_not_the_one_meant_before_sending(store_host,
                                                                            model_path):
    inventory, store = store_host
    result = run_fleet("push-model", str(model_path), "-i", str(inventory), "-l", "pi-store",
                       "--sha256", "0" * 64)
    assert result.returncode == 65
    assert f"has sha256 {SMOLLM2_SHA256}, not {'0' * 64}" in result.stderr
    assert "nothing was sent" in result.stderr and not any(store.iterdir())


def test_bench_measures_each_host_through_its_service_into_one_table(five_hosts):
    result = run_fleet("bench", "-i", str(five_hosts), "-l", "pi-ok,pi-off", "--depth", "0",
                       "--n-prompt", "16", "--n-gen", "8", "--repetitions", "2", "--json")
    assert result.returncode == 1, result.stderr  # pi-off
    ok, off = json.loads(result.stdout)
    assert ok["healthy"] and ok["report"]["model"]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    [measured] = ok["report"]["results"]
    assert measured["depth"] == 0 and measured["tg_tokens_per_second"]["median"] > 0
    assert not off["healthy"] and off["report"] is None

    table = run_fleet("bench", "-i", str(five_hosts), "-l", "pi-ok", "--depth", "0",
                      "--n-prompt", "16", "--n-gen", "8", "--repetitions", "2")
    print(table.stdout)  # the README's example
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["host", "model", "threads", "depth"]
    assert row.split()[:2] == ["pi-ok", "SmolLM2-135M-Instruct.Q4_1"]

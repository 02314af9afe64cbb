"""Bring a virtual Pi up, take it down, and say what state it is in.

Slot N is instance `vpiN`: network namespace and host link `vpiN`, address 10.213.N.2. Its
persistent state (writable layer, NVMe image, SSH keys) lives in `state_dir()/vpiN`; what only
matters while it runs (the nspawn PID, the loop device) is recorded in `runtime.json` there.
Tear-down never trusts that record alone: it looks for the namespace, loop devices, mounts and
processes themselves, so it also cleans up after a run that was killed halfway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.control.host import HostError, run

from . import board as boards
from . import disk, network, proxy, rootfs
from .host import preflight, state_dir

MAX_SLOT = 250
SSH_USER = "pi"
BOOT_TIMEOUT_SECONDS = 300
STOP_TIMEOUT_SECONDS = 60


SUDO_MODES = ("password", "nopasswd")


@dataclass
class Options:
    os: str = rootfs.DEFAULT_RELEASE
    board: str = boards.DEFAULT_BOARD
    nvme: str = "blank"
    nvme_size_gib: int = 64
    # sudo as the release's images have it (None), or: asking for a password, or not.
    sudo: str | None = None
    fresh: bool = False

    @property
    def release(self) -> rootfs.Release:
        return rootfs.RELEASES[self.os]

    @property
    def sudo_mode(self) -> str:
        return self.sudo or self.release.default_sudo


@dataclass
class Status:
    name: str
    slot: int
    address: str
    running: bool
    pid: int | None = None
    os: str | None = None
    board: str | None = None
    nvme: str | None = None
    sudo: str | None = None
    loop_device: str | None = None
    system_state: str | None = None
    boot_seconds: float | None = None


class Instance:
    def __init__(self, slot: int) -> None:
        if not 0 <= slot <= MAX_SLOT:
            raise HostError(f"slot {slot} is out of range: use 0-{MAX_SLOT}")
        self.slot = slot
        self.name = f"vpi{slot}"
        self.dir = state_dir() / self.name
        self.address = network.pi_address(slot)
        # The Pi's HTTP proxy to the outside (see proxy.py).
        self.proxy_address = f"{network.host_address(slot)}:{proxy.PORT}"

    # Paths -------------------------------------------------------------------------------
    @property
    def merged(self) -> Path:
        return self.dir / "root"

    @property
    def key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "ssh" / "known_hosts"

    @property
    def nvme_image(self) -> Path:
        return self.dir / "nvme0n1.img"

    @property
    def sudo_password_file(self) -> Path:
        """pi's password (0600), made per instance when its sudo asks for one."""
        return self.dir / "sudo-password"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def _runtime_file(self) -> Path:
        return self.dir / "runtime.json"

    def _runtime(self) -> dict:
        try:
            return json.loads(self._runtime_file.read_text())
        except (OSError, ValueError):
            return {}

    # SSH ---------------------------------------------------------------------------------
    def ssh_command(self, *command: str, user: str = SSH_USER) -> list[str]:
        return [
            "ssh", "-i", str(self.key),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
            f"{user}@{self.address}", *command,
        ]

    def ssh(
        self, *command: str, timeout: float = 120, check: bool = True, user: str = SSH_USER
    ) -> subprocess.CompletedProcess:
        """Run a shell command on the Pi (as `pi`, or as `root`) and return its result."""
        return run(*self.ssh_command(*command, user=user), check=check, timeout=timeout)

    # State -------------------------------------------------------------------------------
    def _nspawn_pid(self) -> int | None:
        """The systemd-nspawn process running this instance, found by its command line.

        Not from runtime.json alone: a run killed between spawning and recording must still be
        found, and a recorded PID may since have been reused.
        """
        wanted = f"--machine={self.name}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if Path(argv[0].decode(errors="replace")).name == "systemd-nspawn" and wanted in argv:
                return int(entry.name)
        return None

    def is_running(self) -> bool:
        return self._nspawn_pid() is not None

    def status(self, probe: bool = True) -> Status:
        runtime = self._runtime()
        running = self.is_running()
        state = None
        if running and probe:
            result = self.ssh("systemctl", "is-system-running", check=False, timeout=30)
            state = result.stdout.strip() or "unreachable"
        return Status(
            name=self.name, slot=self.slot, address=self.address, running=running,
            pid=self._nspawn_pid(), os=runtime.get("os") if running else None,
            board=runtime.get("board") if running else None,
            nvme=runtime.get("nvme") if running else None,
            sudo=runtime.get("sudo") if running else None,
            loop_device=runtime.get("loop_device") if running else None,
            system_state=state, boot_seconds=runtime.get("boot_seconds") if running else None,
        )

    # Up ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """One `up` or `down` of this slot at a time (released even if the holder is killed)."""
        state_dir().mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(state_dir() / f".{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self, options: Options | None = None) -> Status:
        """Boot the instance (or return at once if it is already running) and wait for SSH."""
        options = options or Options()
        if options.board not in boards.BOARDS:
            raise HostError(
                f"unknown board {options.board!r}: choose one of {', '.join(boards.BOARDS)}"
            )
        if options.os not in rootfs.RELEASES:
            raise HostError(
                f"unknown OS release {options.os!r}: choose one of {', '.join(rootfs.RELEASES)}"
            )
        if options.sudo_mode not in SUDO_MODES:
            raise HostError(f"unknown sudo mode {options.sudo!r}: choose one of "
                            f"{', '.join(SUDO_MODES)}")
        if options.sudo_mode != options.release.default_sudo and not options.release.cloud_init:
            raise HostError(f"{options.os} images had passwordless sudo, made at image time; "
                            "a sudo that asks for a password is for --os trixie")
        preflight()
        with self._locked():
            return self._up(options)

    def _up(self, options: Options) -> Status:
        # Running and fully booted by an earlier `up`: reuse it, if it is what was asked for.
        # Anything else (a boot that was interrupted, leftovers of a crash) starts again.
        runtime = self._runtime()
        if self.is_running() and "boot_seconds" in runtime and not options.fresh:
            running_as = _describe(runtime.get("os"), runtime.get("board"), runtime.get("nvme"),
                                   runtime.get("sudo"))
            asked_for = _describe(options.os, options.board, options.nvme, options.sudo_mode)
            if running_as != asked_for:
                raise HostError(f"{self.name} is running as {running_as}, not {asked_for}: add "
                                "--fresh to recreate it")
            proxy.start(self.proxy_address, self.dir)  # restarted: it may have been killed
            return self.status()
        self._down()
        if options.fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_layer(options)
        base = rootfs.ensure_base(options.release)
        started = time.monotonic()
        try:
            self._mount_root(base)
            self._personalise(options)
            loop_device = self._attach_nvme(options)
            network.create(self.name, self.slot)
            proxy.start(self.proxy_address, self.dir)
            pid = self._spawn(options, loop_device)
            self._runtime_file.write_text(json.dumps({
                "pid": pid, "os": options.os, "board": options.board, "nvme": options.nvme,
                "sudo": options.sudo_mode, "loop_device": loop_device,
            }))
            self._wait_for_boot(started, pid)
        except BaseException:
            self._down()
            raise
        runtime = self._runtime() | {"boot_seconds": round(time.monotonic() - started, 1)}
        self._runtime_file.write_text(json.dumps(runtime))
        return self.status()

    def _check_layer(self, options: Options) -> None:
        """A writable layer belongs to the release it was made on (and keeps its first boot's
        sudo): booting it on another base would mix two systems."""
        recorded = self.dir / "layer.json"
        wanted = {"os": options.os, "sudo": options.sudo_mode}
        if (self.dir / "upper").is_dir() and recorded.exists():
            existing = json.loads(recorded.read_text())
            if existing != wanted:
                raise HostError(
                    f"{self.name} was made as {_describe(existing['os'], sudo=existing['sudo'])}, "
                    f"not {_describe(options.os, sudo=options.sudo_mode)}: add --fresh to "
                    "recreate it (its changes are lost)"
                )
        recorded.write_text(json.dumps(wanted))

    def _mount_root(self, base: Path) -> None:
        upper, work = self.dir / "upper", self.dir / "work"
        for directory in (upper, work, self.merged):
            directory.mkdir(exist_ok=True)
        run(
            "mount", "-t", "overlay", "overlay",
            "-o", f"lowerdir={base},upperdir={upper},workdir={work}", self.merged,
        )

    def _personalise(self, options: Options) -> None:
        """Per-instance identity: hostname, machine-id, SSH host keys, login key, board files."""
        root = self.merged
        (root / "etc/hostname").write_text(f"{self.name}\n")
        hosts = (root / "etc/hosts").read_text()
        if f"\t{self.name}\n" not in hosts:
            (root / "etc/hosts").write_text(f"{hosts}127.0.1.1\t{self.name}\n")
        machine_id = root / "etc/machine-id"
        if not machine_id.read_text().strip():
            machine_id.write_text(os.urandom(16).hex() + "\n")
        if not list((root / "etc/ssh").glob("ssh_host_*_key")):
            run("ssh-keygen", "-A", "-f", root)
        self.key.parent.mkdir(mode=0o700, exist_ok=True)
        if not self.key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", self.key)
        host_key = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"{self.address} {' '.join(host_key)}\n")
        login_key = self.key.with_suffix(".pub").read_text()
        # root's key is the testbed's own way in (`down`, `ssh --root`); pi's is the user's.
        homes = [(root / "root", "0:0")]
        if options.release.cloud_init:
            self._write_cloud_init_seed(options, login_key)
        else:
            homes.append((root / "home/pi", "1000:1000"))
        for home, owner in homes:
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            (ssh_dir / "authorized_keys").write_text(login_key)
            uid, gid = map(int, owner.split(":"))
            for path in (ssh_dir, ssh_dir / "authorized_keys"):
                os.chown(path, uid, gid)
        board = boards.BOARDS[options.board]
        serial = boards.serial_number(self.name)
        board_dir = self.dir / "board"
        shutil.rmtree(board_dir, ignore_errors=True)
        boards.write_devicetree(board_dir / "devicetree", board, serial)
        (board_dir / "cpuinfo").write_text(boards.cpuinfo(board, serial))

    def _write_cloud_init_seed(self, options: Options, login_key: str) -> None:
        """The NoCloud seed on the boot partition, as Raspberry Pi Imager 2.x writes it: the
        hostname and the user pi with a password, the login key and (unless sudo asks for the
        password) a passwordless sudo rule. cloud-init makes the user at first boot."""
        if options.sudo_mode == "password":
            if not self.sudo_password_file.exists():
                self.sudo_password_file.touch(mode=0o600)
                self.sudo_password_file.write_text(secrets.token_urlsafe(18))
            password = self.sudo_password_file.read_text()
        else:
            self.sudo_password_file.unlink(missing_ok=True)
            password = secrets.token_urlsafe(18)  # for the console only; sudo never asks
        hashed = run("openssl", "passwd", "-6", "-stdin", input=password).stdout.strip()
        user = {
            "name": SSH_USER, "groups": "users,adm,dialout,audio,video,plugdev,cdrom,sudo",
            "shell": "/bin/bash", "lock_passwd": False, "passwd": hashed,
            "ssh_authorized_keys": [login_key.strip()],
        }
        if options.sudo_mode == "nopasswd":
            user["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
        user_data = {
            "hostname": self.name, "manage_etc_hosts": True, "users": [user],
            "ssh_pwauth": False,
            # The testbed made the host keys (and knows them) and logs in as root itself.
            "ssh_deletekeys": False, "disable_root": False,
        }
        firmware = self.merged / "boot/firmware"
        # JSON is YAML: no YAML library is needed to write it.
        (firmware / "user-data").write_text("#cloud-config\n" + json.dumps(user_data, indent=2))
        (firmware / "meta-data").write_text(f"instance-id: {self.name}\n")

    def _attach_nvme(self, options: Options) -> str | None:
        """Attach the drive; an existing drive is kept only if it is the kind and size asked for."""
        if options.nvme == "none":
            return None
        wanted = {"kind": options.nvme, "size_gib": options.nvme_size_gib}
        recorded = self.dir / "nvme0n1.json"
        if self.nvme_image.exists():
            try:
                existing = json.loads(recorded.read_text())
            except (OSError, ValueError):
                existing = None
            if existing != wanted:
                raise HostError(
                    f"{self.name}'s NVMe drive is {existing}, not {wanted}: add --fresh to "
                    "replace it (its contents are lost)"
                )
        else:
            disk.create_image(self.nvme_image, options.nvme, options.nvme_size_gib)
            recorded.write_text(json.dumps(wanted))
        return disk.attach(self.nvme_image)

    def _spawn(self, options: Options, loop_device: str | None) -> int:
        board_dir = self.dir / "board"
        command = [
            "systemd-nspawn", "--quiet", "--boot", f"--directory={self.merged}",
            f"--machine={self.name}", "--register=no", "--keep-unit", "--link-journal=no",
            f"--network-namespace-path={network.NETNS_DIR / self.name}",
            f"--setenv=QEMU_CPU={rootfs.QEMU_CPU}", "--console=read-only",
            "--tmpfs=/sys/firmware:mode=0755",
            f"--bind-ro={board_dir / 'devicetree'}:/sys/firmware/devicetree/base",
            # nspawn cannot bind over /proc itself; virtual-pi-board.service does it at boot.
            f"--bind-ro={board_dir / 'cpuinfo'}:/run/virtual-pi/cpuinfo",
        ]
        if loop_device:
            command.append(f"--bind={loop_device}:{disk.DEVICE}")
        # posix_spawn, not Popen: the container outlives this process by design, and a Popen
        # object would warn when collected with its child still running.
        executable = shutil.which(command[0])
        assert executable, "preflight checked that systemd-nspawn is installed"
        return os.posix_spawn(
            executable, command, os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.console_log),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )

    def _wait_for_boot(self, started: float, pid: int) -> None:
        deadline = started + BOOT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            exited, status = os.waitpid(pid, os.WNOHANG)  # nspawn is our child here
            if exited:
                raise HostError(
                    f"{self.name} stopped while booting (systemd-nspawn exit status "
                    f"{os.waitstatus_to_exitcode(status)}):\n{self._console_tail()}"
                )
            if _port_open(self.address, 22):
                result = self.ssh(
                    "systemctl", "is-system-running", "--wait", check=False,
                    timeout=max(1, deadline - time.monotonic()),
                )
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    return
                if result.returncode != 255:  # 255: ssh itself failed; sshd may be restarting
                    raise HostError(
                        f"{self.name} booted into state {state!r}:\n{self._console_tail()}"
                    )
            time.sleep(1)
        raise HostError(
            f"{self.name} did not become reachable over SSH within {BOOT_TIMEOUT_SECONDS} s:\n"
            f"{self._console_tail()}"
        )

    def _console_tail(self, lines: int = 25) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    # Down --------------------------------------------------------------------------------
    def down(self) -> None:
        """Stop the instance and release everything it held; safe to call at any time."""
        with self._locked():
            self._down()

    def _down(self) -> None:
        pid = self._nspawn_pid()
        if pid:
            # An orderly poweroff from inside. (nspawn's own SIGTERM handling sends the container's
            # init SIGRTMIN+3, which qemu-user delivers as a different signal: qemu renumbers
            # real-time signals for its own use.)
            poweroff = run(
                *self.ssh_command("systemctl", "poweroff", "--no-block", user="root"),
                check=False, timeout=30,
            )
            # Unreachable (still booting, or wedged): nothing to wait for.
            grace = STOP_TIMEOUT_SECONDS if poweroff.returncode == 0 else 0
            if not _wait_gone(pid, grace):
                _signal(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
        # A container whose nspawn died keeps running, orphaned: find its processes by their
        # root filesystem, this instance's overlay. Killing its init ends its PID namespace.
        for leftover in _processes_with_root(f"upperdir={self.dir / 'upper'},"):
            _signal(leftover, signal.SIGKILL)
        self._unmount_root()
        disk.detach(self.nvme_image)
        proxy.stop(self.proxy_address, self.dir)
        network.remove(self.name)
        self._runtime_file.unlink(missing_ok=True)

    def _unmount_root(self) -> None:
        deadline = time.monotonic() + 10
        while os.path.ismount(self.merged):
            if run("umount", self.merged, check=False).returncode == 0:
                return
            if time.monotonic() > deadline:  # still busy: detach it now, it frees when idle
                run("umount", "--lazy", self.merged, check=False)
                return
            time.sleep(0.2)


def _describe(os_release: str | None, board: str | None = None, nvme: str | None = None,
              sudo: str | None = None) -> str:
    parts = [os_release or "?"]
    if board:
        parts.append(board)
    if nvme:
        parts.append(f"NVMe {nvme}")
    parts.append(f"sudo {sudo or '?'}")
    return ", ".join(parts)


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                return True
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return True
        time.sleep(0.2)
    return False


def _processes_with_root(mount_option: str) -> list[int]:
    """PIDs whose root mount (as /proc/PID/mountinfo shows it) carries `mount_option`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "mountinfo") as mountinfo:
                for line in mountinfo:
                    if line.split()[4] == "/":
                        if mount_option in line:
                            found.append(int(entry.name))
                        break
        except (OSError, IndexError):
            continue
    return found


def instances() -> list[Instance]:
    """Every instance that has state on this host, by slot."""
    if not state_dir().is_dir():
        return []
    slots = sorted(
        int(entry.name[3:]) for entry in state_dir().iterdir()
        if entry.name.startswith("vpi") and entry.name[3:].isdigit()
        and int(entry.name[3:]) <= MAX_SLOT
    )
    return [Instance(slot) for slot in slots]

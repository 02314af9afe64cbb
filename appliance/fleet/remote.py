"""Commands on the fleet's Pis over SSH (fabric), in parallel, bounded, each with a timeout.
Host keys are checked as Ansible checks them: a key not already known is refused, never
trusted silently. Root's commands go through sudo as Ansible's `become` does, with the inventory's
become password (or the one asked for with -K), sent on sudo's standard input, never in argv."""

from __future__ import annotations

import io
import shlex
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from appliance import layout
from appliance.fleet.inventory import Host

T = TypeVar("T")
DEFAULT_PARALLEL = 10
DEFAULT_TIMEOUT = 20.0  # seconds, for connecting and for each command
CLI = str(layout.VENV / "bin" / "pi-appliance")  # the appliance's own command on the Pi
STREAM_BLOCK_BYTES = 1 << 18


@dataclass
class Output:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class HostResult:
    """One host's row in a fleet command's answer: healthy when it has no problem."""

    host: str
    problems: list[str] = field(default_factory=list, kw_only=True)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def marked_host(self) -> str:
        """The host's name as a table shows it: marked `!` when it has a problem."""
        return ("  " if self.healthy else "! ") + self.host

    def as_dict(self) -> dict[str, Any]:
        fields = {key: value for key, value in asdict(self).items() if key != "problems"}
        return fields | {"problems": self.problems, "healthy": self.healthy}


class Unreachable(Exception):
    """The host could not be reached, refused our key, or showed an unknown host key."""


class CannotBecomeRoot(Exception):
    """sudo wants a password that was not given, or refused the one given."""


class Session:
    """Shell commands on one host, over one connection."""

    def __init__(self, host: Host, connection, timeout: float):
        self.host = host
        self._connection = connection
        self.timeout = timeout
        self._become: str | None = None  # how root is reached: root, nopasswd or password

    def run(self, command: str, timeout: float | None = None, *,
            as_root: bool = False) -> Output:
        from invoke.exceptions import CommandTimedOut

        timeout = self.timeout if timeout is None else timeout
        if as_root:
            self._check_become()
            command, password = self._as_root(command)
        else:
            password = b""
        try:
            result = self._connection.run(
                command, hide=True, warn=True, timeout=timeout,
                in_stream=io.StringIO(password.decode()) if password else False)
        except CommandTimedOut:
            return Output(124, "", f"timed out after {timeout:g} s")
        return Output(result.exited, result.stdout, result.stderr)

    def stream(self, command: str, source: BinaryIO, progress: Callable[[int], None],
               max_rate: float | None = None) -> Output:
        """Run `command` as root with `source` as its standard input, from where `source` is,
        at most `max_rate` bytes a second. A Pi that stops reading for `timeout` seconds ends
        the stream."""
        self._check_become()
        command, password = self._as_root(command)
        channel = self._connection.client.get_transport().open_session(timeout=self.timeout)
        channel.settimeout(self.timeout)
        try:
            channel.exec_command(command)
            channel.sendall(password)
            started, sent = time.monotonic(), 0
            while block := source.read(STREAM_BLOCK_BYTES):
                channel.sendall(block)
                sent += len(block)
                progress(len(block))
                if max_rate:
                    time.sleep(max(0.0, started + sent / max_rate - time.monotonic()))
            channel.shutdown_write()
            stdout = channel.makefile("rb").read().decode(errors="replace")
            stderr = channel.makefile_stderr("rb").read().decode(errors="replace")
            return Output(channel.recv_exit_status(), stdout, stderr)
        except OSError as error:  # includes the timeout
            # What the Pi said (a full disk, a wrong offset) explains a stream it stopped reading.
            said = b""
            while channel.recv_stderr_ready():
                said += channel.recv_stderr(65536)
            code = channel.recv_exit_status() if channel.exit_status_ready() else 255
            return Output(code, "", said.decode(errors="replace").strip()
                          or f"the connection broke: {error or 'timed out'}")
        finally:
            channel.close()

    def _check_become(self) -> None:
        """Raise CannotBecomeRoot unless root is reachable. Found out once per connection, the
        password tried before anything depends on it (a stream must not feed sudo's retries)."""
        if self._become is None:
            probe = self.run("id -u; sudo -n true 2>/dev/null && echo nopasswd")
            words = probe.stdout.split()
            self._become = ("root" if words[:1] == ["0"] else
                            "nopasswd" if "nopasswd" in words else "password")
            if self._become == "password" and self.host.become_password:
                tried = self.run("true", as_root=True)
                if tried.exit_code != 0:
                    self._become = "refused"
        if self._become == "refused":
            raise CannotBecomeRoot(f"sudo on {self.host.name} refused the become password "
                                   "(ansible_become_password or -K)")
        if self._become == "password" and not self.host.become_password:
            raise CannotBecomeRoot(f"sudo on {self.host.name} asks for a password: give it "
                                   "with -K, or as ansible_become_password in the inventory")

    def _as_root(self, command: str) -> tuple[str, bytes]:
        inner = shlex.quote(command)
        if self._become == "root":
            return f"sh -c {inner}", b""
        if self._become == "nopasswd":
            return f"sudo -n -- sh -c {inner}", b""
        # sudo reads the password line from stdin and leaves the rest to the command.
        return (f"sudo -S -p '' -- sh -c {inner}",
                (self.host.become_password or "").encode() + b"\n")



@contextmanager
def connected(host: Host, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Session]:
    """A session on `host`, over one connection."""
    import paramiko
    from fabric import Connection

    connect_kwargs: dict = {"banner_timeout": timeout, "auth_timeout": timeout}
    if host.ssh_key_file:
        connect_kwargs.update(key_filename=str(Path(host.ssh_key_file).expanduser()),
                              look_for_keys=False)
    connection = Connection(host.address, user=host.ssh_user, port=host.ssh_port,
                            connect_timeout=timeout, connect_kwargs=connect_kwargs)
    connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    # Where ssh (and so Ansible) looks: UserKnownHostsFile if the inventory sets it.
    if host.known_hosts_file:
        connection.client.load_system_host_keys(str(Path(host.known_hosts_file).expanduser()))
    else:
        connection.client.load_system_host_keys()
    try:
        connection.open()
    except paramiko.SSHException as error:  # includes an unknown or changed host key
        raise Unreachable(_why(error, host)) from None
    except OSError as error:
        raise Unreachable(f"cannot connect to {host.address}:{host.ssh_port}: "
                          f"{error.strerror or error}") from None
    try:
        yield Session(host, connection, timeout)
    finally:
        connection.close()


def _why(error: Exception, host: Host) -> str:
    text = str(error)
    if "not found in known_hosts" in text:
        where = host.known_hosts_file or "~/.ssh/known_hosts"
        return (f"its host key is not in {where}: check the key's fingerprint and add it "
                f"(ssh-keyscan -p {host.ssh_port} {host.address} after checking), as for Ansible")
    return text or type(error).__name__


def each(hosts: list[Host], work: Callable[[Host], T], parallel: int = DEFAULT_PARALLEL) -> list[T]:
    """`work` on every host, at most `parallel` at once, results in the hosts' order."""
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        return list(pool.map(work, hosts))

"""Commands on the fleet's Pis over SSH (fabric), in parallel, bounded, each with a timeout.
Host keys are checked as Ansible checks them: a key not already known is refused, never
trusted silently."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from appliance.fleet.inventory import Host

T = TypeVar("T")
DEFAULT_PARALLEL = 10
DEFAULT_TIMEOUT = 20.0  # seconds, for connecting and for each command


@dataclass
class Output:
    exit_code: int
    stdout: str
    stderr: str


class Unreachable(Exception):
    """The host could not be reached, refused our key, or showed an unknown host key."""


@contextmanager
def connected(host: Host, timeout: float = DEFAULT_TIMEOUT) -> Iterator[Callable[..., Output]]:
    """A function running shell commands on `host`, over one connection."""
    import paramiko
    from fabric import Connection
    from invoke.exceptions import CommandTimedOut

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

    def run(command: str, command_timeout: float = timeout) -> Output:
        try:
            result = connection.run(command, hide=True, warn=True, in_stream=False,
                                    timeout=command_timeout)
        except CommandTimedOut:
            return Output(124, "", f"timed out after {command_timeout:g} s")
        return Output(result.exited, result.stdout, result.stderr)

    try:
        connection.open()
    except paramiko.SSHException as error:  # includes an unknown or changed host key
        raise Unreachable(_why(error, host)) from None
    except OSError as error:
        raise Unreachable(f"cannot connect to {host.address}:{host.ssh_port}: "
                          f"{error.strerror or error}") from None
    try:
        yield run
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

"""The fleet as Ansible sees it: `ansible-inventory --list`, so groups, host vars, `ansible_host`,
users, ports and keys mean what they mean to Ansible, and `--limit` patterns are Ansible's own."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.exitcodes import ApplianceError, ExitCode
from appliance.settings import ServerSettings

# The group site.yml provisions (playbooks/site.yml).
APPLIANCES_GROUP = "appliances"
# Ansible's names for sudo's password.
BECOME_PASSWORD_VARS = ("ansible_become_password", "ansible_become_pass")
# A service bound to every address answers on loopback too.
_ANY_ADDRESS = {"0.0.0.0", "::", ""}  # noqa: S104 - recognised, not bound


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # where SSH and Prometheus reach it
    ssh_user: str | None
    ssh_port: int
    ssh_key_file: str | None
    known_hosts_file: str | None
    service_host: str  # the address the API is bound to on the Pi
    service_port: int
    become_password: str | None = field(default=None, repr=False)  # for sudo, as Ansible's

    @property
    def local_url(self) -> str:
        """The API as a command on the Pi reaches it."""
        host = "127.0.0.1" if self.service_host in _ANY_ADDRESS else self.service_host
        return f"http://{host}:{self.service_port}"

    @property
    def scrape_target(self) -> str:
        return f"{self.address}:{self.service_port}"


def _ssh_option(common_args: str, name: str) -> str | None:
    words = shlex.split(common_args)
    for index, word in enumerate(words):
        option = words[index + 1] if word == "-o" and index + 1 < len(words) else (
            word[2:] if word.startswith("-o") else "")
        key, _, value = option.partition("=")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def host_from_vars(name: str, hostvars: dict) -> Host:
    server = ServerSettings()
    common = " ".join(str(hostvars.get(key, "")) for key in
                      ("ansible_ssh_common_args", "ansible_ssh_extra_args"))
    try:
        return Host(
            name=name,
            address=str(hostvars.get("ansible_host", name)),
            ssh_user=hostvars.get("ansible_user"),
            ssh_port=int(hostvars.get("ansible_port", 22)),
            ssh_key_file=hostvars.get("ansible_ssh_private_key_file"),
            known_hosts_file=_ssh_option(common, "UserKnownHostsFile"),
            service_host=str(hostvars.get("service_host", server.host)),
            service_port=int(hostvars.get("service_port", server.port)),
            become_password=next((hostvars[key] for key in BECOME_PASSWORD_VARS
                                  if key in hostvars), None),
        )
    except (TypeError, ValueError) as error:
        raise ApplianceError(f"inventory host {name}: {error} (ansible_port and service_port "
                             "are port numbers)", ExitCode.CONFIG_INVALID) from None


def _ansible(program: str, inventory: Path | None, *args: str) -> str:
    """The output of an ansible-core program, the one installed beside this Python (the control
    extra) when there is one."""
    beside = Path(sys.executable).parent / program
    command = [str(beside) if beside.exists() else program, *args]
    if inventory is not None:
        command += ["-i", str(inventory)]
    environment = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal",
                   "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
                   "ANSIBLE_DEPRECATION_WARNINGS": "0"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False, env=environment)
    except FileNotFoundError:
        raise ApplianceError(f"{program} is not installed: install the control machine's "
                             "tools (pip install 'pi-llm-appliance[control]')",
                             ExitCode.UNREACHABLE) from None
    if done.returncode != 0:
        raise ApplianceError(f"{program} failed: {(done.stderr or done.stdout).strip()[-1500:]}",
                             ExitCode.CONFIG_INVALID)
    return done.stdout


def read_inventory(inventory: Path | None, limit: str | None = None) -> list[Host]:
    """The appliances of `inventory` (Ansible's configured one when None) that `limit` selects."""
    data = json.loads(_ansible("ansible-inventory", inventory, "--list",
                               *(["--limit", limit] if limit else [])))
    hostvars = data.get("_meta", {}).get("hostvars", {})
    names = _members(data, APPLIANCES_GROUP)
    if not names:
        raise ApplianceError(f"no host of the {APPLIANCES_GROUP!r} group in the inventory"
                             + (f" matches {limit!r}" if limit else ""), ExitCode.CONFIG_INVALID)
    hosts = [host_from_vars(name, hostvars.get(name, {})) for name in names]
    # A templated or vaulted password means what Ansible makes of it: ask Ansible.
    rendered = _rendered_become_passwords(
        inventory, [host.name for host in hosts if _needs_rendering(host.become_password)])
    return [dataclasses.replace(host, become_password=rendered[host.name])
            if host.name in rendered else host for host in hosts]


def _needs_rendering(password: object) -> bool:
    return isinstance(password, dict) or (isinstance(password, str) and "{{" in password)


def _rendered_become_passwords(inventory: Path | None, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    first, second = BECOME_PASSWORD_VARS
    output = _ansible("ansible", inventory, ",".join(names), "-m", "ansible.builtin.debug",
                      "-a", f"msg={{{{ {first} | default({second}) }}}}")
    rendered, decoder = {}, json.JSONDecoder()
    for match in re.finditer(r"^(\S+) \| SUCCESS => ", output, re.MULTILINE):
        value = decoder.raw_decode(output, match.end())[0].get("msg")
        if isinstance(value, str):
            rendered[match.group(1)] = value
    return rendered


def _members(data: dict, group: str) -> list[str]:
    """A group's hosts with those of its children, in the inventory's order, once each."""
    entry = data.get(group, {})
    found = list(entry.get("hosts", []))
    for child in entry.get("children", []):
        found += _members(data, child)
    return list(dict.fromkeys(found))

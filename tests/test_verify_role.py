"""The verify role's judgement (the gate between upgrade batches), against scripted /health
answers: what it waits for, what it passes and what it fails. The role's real run against the
real service is in test_provisioning.py; these are the sequences a provisioning run cannot cheaply
produce (a fallback and its restart, verification off, a proxy in the way)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AUTO = {"policy": "auto", "fallback": None}
FAILED = {"instance_id": "first", "result": "fail", "reason": "7.1 tok/s is below the target",
          "measured_tps": 7.1, "target_tps": 8.0}
STEP = {"attempts": [{"from": "qwen3-30b", "to": "llama-3.2-1b", "measured_tps": 7.1}]}


def health(status: str, instance: str, verification: dict | None = None,
           policy: dict | None = None, reason: str | None = None) -> tuple[int, dict]:
    body = {"status": status, "reason": reason, "instance_id": instance,
            "model": {"id": "llama-3.2-1b"}, "model_policy": policy or {"policy": "pinned"},
            "verification": verification, "board": None}
    return (200 if status in ("ok", "degraded") else 503), body


class ScriptedHealth:
    """Answers /health from a script, one entry per request (the last one repeats)."""

    def __init__(self, script: list[tuple[int, dict]]) -> None:
        self.script, self.requests = script, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = outer.script[min(outer.requests, len(outer.script) - 1)]
                outer.requests += 1
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


def judge(tmp_path: Path, script: list[tuple[int, dict]], **env: str):
    served = ScriptedHealth(script)
    playbook = tmp_path / "judge.yml"
    playbook.write_text(f"""
- name: Judge
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The verify role
      ansible.builtin.import_role:
        name: pi_llm.appliance.verify
      vars:
        verify_service_url: {served.url}
        verify_wait_seconds: 30
        verify_poll_seconds: 1
    - name: Keep the summary
      ansible.builtin.copy:
        content: "{{{{ verify_summary | to_json }}}}"
        dest: {tmp_path / "summary.json"}
        mode: "0600"
""")
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,", str(playbook),
         "--start-at-task", "pi_llm.appliance.verify : Wait for the model to load and the speed "
         "verification of this start", "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_NOCOLOR": "1", "HOME": str(tmp_path),
             "ANSIBLE_COLLECTIONS_PATH": str(REPOSITORY / "collections"), **env})
    served.server.shutdown()
    served.server.server_close()
    kept = tmp_path / "summary.json"
    summary = json.loads(kept.read_text()) if kept.exists() else None
    return result, summary, served.requests


def test_it_waits_through_loading_verification_and_an_auto_fallback_restart(tmp_path):
    result, summary, requests = judge(tmp_path, [
        health("loading", "first", policy=AUTO),
        health("verifying", "first", policy=AUTO),
        # Below target: the verdict is written, then the fallback step, then the restart.
        health("degraded", "first", FAILED, AUTO, FAILED["reason"]),
        health("degraded", "first", FAILED | {"fallback": STEP}, AUTO, FAILED["reason"]),
        health("verifying", "second", FAILED | {"fallback": STEP}, AUTO),
        health("ok", "second", {"instance_id": "second", "result": "pass", "measured_tps": 10.4,
                                "target_tps": 8.0}, AUTO),
    ])
    assert result.returncode == 0, result.stdout[-3000:]
    assert requests == 6
    assert summary["status"] == "ok" and summary["result"] == "pass"
    assert summary["measured_tps"] == 10.4


def test_a_fallback_that_stopped_fails_the_host_with_its_reason(tmp_path):
    stopped = FAILED | {"fallback": {**STEP, "stopped": "no variant faster fits"}}
    result, _, requests = judge(tmp_path, [
        health("degraded", "first", stopped, AUTO, FAILED["reason"])])
    assert result.returncode == 2
    assert requests == 1
    assert "localhost: degraded: 7.1 tok/s is below the target" in result.stdout


def test_with_verification_off_a_ready_service_passes_and_an_old_verdict_is_ignored(tmp_path):
    old = FAILED | {"instance_id": "before-the-restart"}
    result, summary, _ = judge(tmp_path, [health("ok", "now", old)])
    assert result.returncode == 0, result.stdout[-3000:]
    assert summary["result"] == "off" and summary["measured_tps"] is None


@pytest.mark.parametrize("status", ["refused", "failed"])
def test_a_service_that_is_not_serving_fails_the_host(tmp_path, status):
    result, _, _ = judge(tmp_path, [health(status, "first", reason="the model is corrupt")])
    assert result.returncode == 2
    assert f"localhost: {status}: the model is corrupt" in result.stdout


def test_the_pi_own_service_is_asked_directly_even_behind_a_proxy(tmp_path):
    # The provisioning play sets http_proxy for apt and pip; loopback must not go through it.
    result, summary, _ = judge(tmp_path, [health("ok", "now")], http_proxy="http://127.0.0.1:9",
                               HTTP_PROXY="http://127.0.0.1:9")
    assert result.returncode == 0, result.stdout[-3000:]
    assert summary["status"] == "ok"


def test_an_answer_that_is_not_the_service_fails_at_once(tmp_path):
    result, _, requests = judge(tmp_path, [(400, {"error": "send absolute http:// URLs"})])
    assert result.returncode == 2
    assert requests == 1  # not 180 retries
    assert "Status code was 400" in result.stdout

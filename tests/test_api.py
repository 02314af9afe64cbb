"""The HTTP API in-process, on the real model: shapes, errors, health, metrics, the queue."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

import appliance
from appliance.service.app import create_app
from appliance.service.engine import PROMPT_CHUNK_MIN_TOKENS, Engine, GenerationStats, Sampling
from tests.helpers import DOCUMENT, error_of, metric_value

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
        "temperature": 0, "seed": 1}


def sse_events(data: bytes) -> list:
    events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_chat_completion_has_openai_shape_and_usage(client):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_same_seed_same_answer(client):
    request = {**CHAT, "temperature": 0.9, "max_tokens": 12}
    first = client.post("/v1/chat/completions", json=request).get_json()
    second = client.post("/v1/chat/completions", json=request).get_json()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


def test_streamed_chat_ends_with_done_and_matches_usage(client):
    response = client.post("/v1/chat/completions",
                           json={**CHAT, "max_tokens": 16, "ignore_eos": True, "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = sse_events(response.get_data())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 16


def test_text_completion_honours_stop_sequence(client):
    response = client.post("/v1/completions", json={
        "prompt": "Count: one, two, three, four, five,", "max_tokens": 30, "temperature": 0,
        "stop": [","]})
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["object"] == "text_completion"
    assert "," not in body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_models_lists_the_loaded_model(client, shared_engine):
    body = client.get("/v1/models").get_json()
    assert [model["id"] for model in body["data"]] == [shared_engine.facts.id]
    assert body["data"][0]["meta"]["sha256"] == shared_engine.facts.sha256


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages"),
    ({**CHAT, "temperature": 5}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "n": 3}, "n"),
    ({**CHAT, "n_discard": -5}, "n_discard: unknown parameter"),
    ({**CHAT, "seed": -2}, "seed"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
])
def test_bad_parameters_are_400_and_say_which(client, body, fragment):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_malformed_json_is_400(client):
    response = client.post("/v1/chat/completions", data=b'{"messages": [',
                           content_type="application/json")
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


def test_max_tokens_above_cap_is_400(client, settings):
    response = client.post("/v1/chat/completions",
                           json={**CHAT, "max_tokens": settings.limits.max_tokens + 1})
    assert response.status_code == 400
    assert "limits.max_tokens" in error_of(response)["message"]


def test_lowering_the_cap_alone_also_bounds_requests_that_do_not_say(make_settings,
                                                                     shared_engine):
    app = create_app(make_settings(limits={"max_tokens": 3}), shared_engine)
    body = app.test_client().post("/v1/completions", json={
        "prompt": "Once upon a time", "ignore_eos": True}).get_json()
    assert body["usage"]["completion_tokens"] == 3


def test_prompt_longer_than_context_is_400_not_truncated(client):
    response = client.post("/v1/completions", json={"prompt": "word " * 3000, "max_tokens": 4})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded"
    assert "context holds 2048" in error["message"]


def test_unknown_route_is_404_in_openai_shape(client):
    response = client.get("/v1/assistants")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"


def test_oversized_body_is_413(make_settings, shared_engine):
    app = create_app(make_settings(server={"max_request_bytes": 2048}), shared_engine)
    response = app.test_client().post("/v1/completions", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert "server.max_request_bytes" in error_of(response)["message"]


def test_foreign_host_header_is_refused(client):
    # DNS rebinding: a web page's request arrives with its own host name.
    response = client.get("/v1/models", headers={"Host": "attacker.example"})
    assert response.status_code == 400


@pytest.fixture
def keyed_client(make_settings, shared_engine, tmp_path: Path):
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    app = create_app(make_settings(server={"api_key_file": str(key_file)}), shared_engine)
    return app.test_client()


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"),
    ("Bearer wrong-key-0123456789abcdef", "invalid_api_key"),
    ("Basic s3cret-key-0123456789abcdef", "missing_api_key"),
])
def test_api_needs_the_key(keyed_client, header, code):
    headers = {"Authorization": header} if header else {}
    response = keyed_client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == code
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_right_key_is_accepted_and_health_needs_none(keyed_client):
    ok = keyed_client.get("/v1/models",
                          headers={"Authorization": "Bearer s3cret-key-0123456789abcdef"})
    assert ok.status_code == 200
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/metrics").status_code == 401


def test_world_readable_key_file_is_refused(make_settings, tmp_path: Path):
    from appliance.exitcodes import ConfigError

    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key-0123456789abcdef\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        create_app(make_settings(server={"api_key_file": str(key_file)}))


def test_health_goes_from_loading_503_to_ok_200(make_settings):
    settings = make_settings()
    engine = Engine(settings.model, settings.limits, settings.paths.state_dir)
    client = create_app(settings, engine).test_client()
    loading = client.get("/health")
    assert loading.status_code == 503
    assert loading.get_json()["status"] == "loading"
    assert loading.get_json()["model"] is None
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503
    assert error_of(refused)["code"] == "model_not_ready"
    assert client.get("/v1/models").status_code == 503

    engine.load()
    ready = client.get("/health")
    assert ready.status_code == 200
    body = ready.get_json()
    assert body["status"] == "ok"
    model = body["model"]
    assert model["quantization"] == "Q4_1"
    assert model["threads"] == 2 and model["context"] == 2048
    assert len(model["sha256"]) == 64
    assert body["verification"] is None


def test_health_carries_the_last_verification(client, settings):
    result = {"result": "pass", "decode_tokens_per_second": 9.1, "target_tps": 8.0}
    settings.verify_state_file.write_text(json.dumps(result))
    assert client.get("/health").get_json()["verification"] == result


def loaded_engine(settings) -> Engine:
    """An engine of its own, for a test that changes its state or its settings."""
    engine = Engine(settings.model, settings.limits, settings.paths.state_dir)
    engine.load()
    return engine


def client_holding_the_model(make_settings, **limits):
    """A client on its own engine, and a stream that holds the model after its first chunk."""
    settings = make_settings(limits=limits)
    engine = loaded_engine(settings)
    client = create_app(settings, engine).test_client()
    holding = client.post("/v1/chat/completions",
                          json={**CHAT, "stream": True, "max_tokens": 50, "ignore_eos": True})
    next(holding.response)
    return client, holding


def test_queue_full_is_429_with_retry_after(make_settings):
    client, running = client_holding_the_model(make_settings, queue_size=0)
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429
    assert error_of(refused)["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    running.close()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_stuck_generation_makes_health_not_ok(make_settings):
    client, stuck = client_holding_the_model(make_settings, stall_seconds=0.3)
    time.sleep(0.5)  # the generation has started and makes no progress
    health = client.get("/health")
    assert health.status_code == 503
    assert health.get_json()["status"] == "stalled"
    assert health.get_json()["engine"]["heartbeat_age_seconds"] > 0.3
    stuck.close()
    assert client.get("/health").status_code == 200


def test_a_prompt_that_outlasts_the_stall_limit_keeps_health_ok_and_shows_progress(
        make_settings):
    # At the default batch (512 tokens a call), chunks follow the stall limit, not the batch. The
    # limit is set from this machine's measured speed, as eight of the smallest chunks: short
    # enough that the prompt outlasts it twice over, long enough for a chunk on a busy machine
    # (CI builds virtual Pis beside this test).
    settings = make_settings(limits={"stall_seconds": 60})
    engine = loaded_engine(settings)
    lease = engine.acquire()
    list(engine.generate(lease, engine.text_prompt("Warming up the speed estimate. " * 40),
                         Sampling(max_tokens=1), GenerationStats(0)))
    lease.release()
    stall = 8 * PROMPT_CHUNK_MIN_TOKENS / engine.prompt_tokens_per_second
    engine.limits = engine.limits.model_copy(update={"stall_seconds": stall})
    client = create_app(settings, engine).test_client()
    seen: list[tuple[int, dict]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            reply = client.get("/health")
            seen.append((reply.status_code, reply.get_json()))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.monotonic()
    reply = client.post("/v1/completions", json={"prompt": DOCUMENT, "max_tokens": 2})
    elapsed = time.monotonic() - started
    done.set()
    poller.join()
    assert reply.status_code == 200, reply.get_json()
    assert reply.get_json()["usage"]["prompt_tokens"] > 1000
    assert elapsed > 2 * stall, "the evaluation must outlast the stall limit to prove anything"
    assert {(status, body["status"]) for status, body in seen} == {(200, "ok")}
    progress = [body["engine"]["prompt"] for _, body in seen if body["engine"]["prompt"]]
    assert any(0 < p["evaluated"] < p["total"] for p in progress), progress
    assert all(body["engine"]["heartbeat_age_seconds"] < stall for _, body in seen)


def test_a_cancelled_prompt_stops_between_chunks_and_its_evaluated_start_is_reused(
        make_settings, shared_engine):
    engine = loaded_engine(make_settings(model={"batch": 32}))
    prompt = engine.text_prompt(DOCUMENT)
    greedy = Sampling(max_tokens=8, temperature=0.0, ignore_eos=True)
    checks: list[int] = []

    def gone_after_three_chunks() -> bool:
        checks.append(engine.prompt_tokens_evaluated)
        return len(checks) > 3

    lease = engine.acquire()
    stats = GenerationStats(prompt_tokens=len(prompt))
    assert list(engine.generate(lease, prompt, greedy, stats, gone_after_three_chunks)) == []
    lease.release()
    assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
    assert engine.prompt_tokens_evaluated == 3 * 32  # three chunks, then it stopped
    assert engine.prompt_progress is None

    # The same document again: only the rest is evaluated, and the answer is what an engine
    # that evaluated it all at once gives.
    lease = engine.acquire()
    resumed = "".join(engine.generate(lease, prompt, greedy, GenerationStats(len(prompt))))
    lease.release()
    assert engine.prompt_tokens_evaluated == len(prompt)
    lease = shared_engine.acquire()
    whole = "".join(shared_engine.generate(lease, prompt, greedy, GenerationStats(len(prompt))))
    lease.release()
    assert resumed == whole and resumed


def test_unset_the_stall_limit_follows_the_measured_speeds(make_settings):
    engine = loaded_engine(make_settings())
    assert engine.stall_limit() == 120.0  # nothing measured yet
    lease = engine.acquire()
    list(engine.generate(lease, engine.text_prompt(DOCUMENT), Sampling(max_tokens=4),
                         GenerationStats(0)))
    lease.release()
    assert engine.prompt_tokens_per_second > 10  # measured, and fast enough here for the floor
    assert engine.stall_limit() == 60.0  # fast: the floor
    # A device that evaluates 2 prompt tokens a second needs 16 s for the smallest chunk.
    engine.prompt_tokens_per_second = 2.0
    assert engine.stall_limit() == 160.0


def test_metrics_count_requests_and_tokens(make_settings, shared_engine):
    client = create_app(make_settings(), shared_engine).test_client()
    # Closed, as the HTTP server closes every response: a duration ends there.
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "ignore_eos": True}).close()
    client.post("/v1/chat/completions", json={**CHAT, "temperature": 9}).close()
    text = client.get("/metrics").get_data(as_text=True)
    assert metric_value(text, 'appliance_requests_total{endpoint="/v1/chat/completions",'
                              'status="200"}') == 1
    assert metric_value(text, 'appliance_requests_total{endpoint="/v1/chat/completions",'
                              'status="400"}') == 1
    assert metric_value(text, "appliance_generated_tokens_total") == 5
    assert metric_value(text, "appliance_prompt_tokens_total") > 5
    assert metric_value(text, "appliance_generation_tokens_per_second_count") == 1
    assert metric_value(text, "appliance_generation_tokens_per_second_sum") > 0
    assert metric_value(text, "appliance_time_to_first_token_seconds_count") == 1
    assert metric_value(text, "appliance_queue_depth") == 0
    assert metric_value(text, "appliance_model_load_seconds") > 0
    assert metric_value(text, 'appliance_engine_state{state="ready"}') == 1
    # Fleet throughput is a ratio of counters; the seconds cover every generated token.
    assert 0 < metric_value(text, "appliance_generation_seconds_total") < 60
    assert metric_value(text, "appliance_request_duration_seconds_count"
                              '{endpoint="/v1/chat/completions"}') == 2


def test_metrics_are_what_prometheus_parses_and_promtool_accepts(make_settings, shared_engine,
                                                                 pi5_root):
    settings = make_settings(paths={"hardware_root": str(pi5_root)}, verify={"enabled": True})
    client = create_app(settings, shared_engine).test_client()
    client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    response = client.get("/metrics")
    # One charset: Prometheus 2 logs a duplicate on every scrape, Prometheus 3 fails it.
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.get_data(as_text=True)
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "_created" not in text
    assert metric_value(text, "process_resident_memory_bytes") > 50e6  # the model is mapped in
    model = shared_engine.facts
    assert metric_value(text, f'appliance_model_info{{model="{model.id}",quantization='
                              f'"{model.quantization}",sha256="{model.sha256}"}}') == 1
    assert metric_value(text, f'appliance_build_info{{version="{appliance.__version__}"}}') == 1
    assert metric_value(text, 'appliance_status{status="verifying"}') == 1  # nothing verified it
    assert metric_value(text, 'appliance_status{status="ok"}') == 0
    assert metric_value(text, 'appliance_context_tokens{of="size"}') == model.context
    assert 0 < metric_value(text, 'appliance_context_tokens{of="held"}') <= model.context
    assert metric_value(text, "appliance_prompt_evaluation_seconds_total") > 0


def test_a_verification_is_exported_with_when_it_finished(make_settings, shared_engine):
    settings = make_settings(verify={"enabled": True})
    app = create_app(settings, shared_engine)
    settings.verify_state_file.parent.mkdir(parents=True, exist_ok=True)
    settings.verify_state_file.write_text(json.dumps({
        "result": "pass", "instance_id": app.extensions["appliance.instance_id"],
        "timestamp": "2026-12-01T10:00:00Z", "measured_tps": 9.5, "depth": 0,
        "target_tps": 8.0}))
    text = app.test_client().get("/metrics").get_data(as_text=True)
    # A timestamp, not an age: `time() - …` in an alert finds a verification gone stale.
    assert metric_value(text, "appliance_verification_timestamp_seconds") == 1796119200
    assert metric_value(text, 'appliance_status{status="ok"}') == 1
    assert metric_value(text, 'appliance_verification_tokens_per_second{depth="0",'
                              'gated="true"}') == 9.5


def test_health_and_metrics_report_the_board(make_settings, shared_engine, pi5_root):
    app = create_app(make_settings(paths={"hardware_root": str(pi5_root)}), shared_engine)
    client = app.test_client()
    board = client.get("/health").get_json()["board"]
    assert board["model"] == "Raspberry Pi 5 Model B Rev 1.1"
    assert board["soc_temperature_celsius"] == 81.25
    assert board["throttle"]["now"] == {"under_voltage": False, "arm_frequency_capped": True,
                                        "throttled": True, "soft_temperature_limit": False}
    assert board["throttle"]["since_boot"]["under_voltage"] is False
    assert board["throttle"]["since_boot"]["throttled"] is True
    text = client.get("/metrics").get_data(as_text=True)
    assert metric_value(text, "appliance_soc_temperature_celsius") == 81.25
    assert metric_value(text, 'appliance_throttle_flag{condition="throttled",when="now"}') == 1


def test_board_facts_are_absent_not_faked_off_a_pi(client, tmp_path):
    if os.path.exists("/sys/class/thermal/thermal_zone0/temp"):
        pytest.skip("this machine has a thermal zone")
    assert "soc_temperature_celsius" not in client.get("/health").get_json()["board"]


def test_every_generation_runs_on_the_one_inference_thread(make_settings, shared_engine,
                                                           monkeypatch):
    # llama.cpp's OpenMP workers belong to the calling thread: generations arriving on many HTTP
    # threads must all be decoded on one, or idle worker teams pile up and halve decode speed.
    threads = set()
    decode = shared_engine._decode

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        yield from decode(*args, **kwargs)

    monkeypatch.setattr(shared_engine, "_decode", recording)
    client = create_app(make_settings(), shared_engine).test_client()

    def ask() -> None:
        reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert reply.status_code == 200

    callers = [threading.Thread(target=ask, name=f"http-{n}") for n in range(3)]
    for caller in callers:
        caller.start()
        caller.join()
    assert len(threads) == 1 and threads.pop().startswith("inference")


def test_unset_threads_are_measured_once_per_model_and_kept(make_settings, monkeypatch):
    """Decode is timed at 1…physical cores on the loaded model; the fastest serves, and a restart
    of the same model reads the figures instead of timing again."""
    monkeypatch.setattr("appliance.service.engine.physical_core_count", lambda: 2)
    settings = make_settings(model={"threads": None})
    engine = loaded_engine(settings)
    choice = engine.facts.threads_choice
    rates = {int(count): rate for count, rate in choice["tg_tokens_per_second"].items()}
    assert choice["source"] == "measured" and set(rates) == {1, 2}
    assert engine.facts.threads == choice["threads"]
    assert rates[choice["threads"]] >= 0.98 * max(rates.values())
    stored = json.loads((settings.paths.state_dir / "threads.json").read_text())
    assert stored[engine.facts.sha256]["threads"] == choice["threads"]
    # It serves with the kept count, and the next start does not time again.
    assert greedy_answer(engine)
    monkeypatch.setattr("appliance.service.tuning.decode_rates", pytest.fail)
    again = loaded_engine(settings).facts.threads_choice
    assert again["measured_at"] == choice["measured_at"]
    # A number in the configuration is used as given.
    assert loaded_engine(make_settings()).facts.threads_choice == {
        "threads": 2, "source": "model.threads"}


def greedy_answer(engine: Engine, question: str = "Name three colours.") -> str:
    prompt, _stops = engine.chat_prompt([{"role": "user", "content": question}])
    lease = engine.acquire()
    try:
        return "".join(engine.generate(lease, prompt, Sampling(max_tokens=12, temperature=0.0),
                                       GenerationStats(len(prompt))))
    finally:
        lease.release()


@pytest.mark.parametrize(("flash", "cache"), [(False, "f16"), (True, "q8_0"), (True, "q4_0")])
def test_flash_attention_and_kv_cache_type_serve_the_same_answers(make_settings, flash, cache,
                                                                   shared_engine):
    """Each attention setting loads and answers as the default engine does. Greedy output drifts
    after a few tokens (other kernels round differently), so the opening is compared."""
    engine = loaded_engine(make_settings(model={"flash_attention": flash,
                                                "kv_cache_type": cache}))
    assert (engine.facts.flash_attention, engine.facts.kv_cache_type) == (flash, cache)
    answer, default = greedy_answer(engine), greedy_answer(shared_engine)
    assert re.findall(r"\w+", answer)[:2] == re.findall(r"\w+", default)[:2], (answer, default)

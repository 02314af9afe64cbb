"""`pi-appliance bench` and `verify`: honest figures, the verdict, and what /health makes of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.control.llamacpp import pinned_version
from appliance.exitcodes import ConfigError
from appliance.hardware.bandwidth import load_bandwidth
from appliance.models.store import ModelStore
from appliance.planning.fallback import fall_back
from appliance.service.app import create_app
from appliance.settings import validate
from appliance.verification import roofline
from appliance.verification.bench import BenchSpec, Endpoint, InProcess
from appliance.verification.conditions import Conditions, Monitor, parse_pmic_adc
from appliance.verification.verify import write_result
from tests.helpers import SMOLLM2_SHA256, free_port, http_json, metric_value, write_config

QUICK = ("--depth", "0,32", "--n-prompt", "16", "--n-gen", "8", "--repetitions", "2")
# A quick verification at a realistic shape; the target decides the verdict. `pi-appliance
# verify` runs it, as pi-llm-appliance-verify.service does on a Pi.
QUICK_VERIFY = {"enabled": True, "conversation_depth": 64, "n_prompt": 16, "n_gen": 16,
                "repetitions": 2, "wait_seconds": 60, "by": "unit"}

# `vcgencmd pmic_read_adc` on a Raspberry Pi 5 (abridged): each rail's current and voltage.
PMIC_SAMPLE = """\
     3V7_WL_SW_A current(0)=0.10000000A
     3V3_SYS_A current(1)=0.20000000A
     VDD_CORE_A current(7)=2.00000000A
     3V7_WL_SW_V volt(8)=3.70000000V
     3V3_SYS_V volt(9)=3.30000000V
     VDD_CORE_V volt(15)=0.90000000V
     EXT5V_V volt(24)=5.10000000V
"""


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_bench_in_process_reports_pp_tg_ttft_per_depth_with_its_conditions(
    capsys, model_path, tmp_path
):
    code, out = run_cli(capsys, "bench", "--model", str(model_path), "--threads", "2",
                        "--state-dir", str(tmp_path), "--json", *QUICK)
    report = json.loads(out)
    assert code == 0
    assert [row["depth"] for row in report["results"]] == [0, 32]
    for row in report["results"]:
        for figure in ("pp_tokens_per_second", "tg_tokens_per_second", "time_to_first_token_ms"):
            assert set(row[figure]) == {"median", "min", "max", "stdev", "samples"}
            assert len(row[figure]["samples"]) == 2 and row[figure]["median"] > 0
        assert (row["n_prompt"], row["n_gen"]) == (16, 8)
    assert report["model"]["sha256"] == SMOLLM2_SHA256
    assert report["model"]["quantization"] == "Q4_1"
    assert "CPU :" in report["system_info"] and report["threads"] == 2
    assert report["machine"]["cpu_model"] and report["machine"]["memory_total_bytes"] > 0
    assert report["machine"]["llama_cpp_python_version"] == pinned_version()
    assert report["conditions"]["valid"] is True
    assert report["spec"] == {"depths": [0, 32], "n_prompt": 16, "n_gen": 8, "repetitions": 2,
                              "warmup": True}


def test_bench_table_and_roofline_from_a_measured_bandwidth(capsys, model_path, tmp_path):
    code, out = run_cli(capsys, "bench", "--bandwidth", "--state-dir", str(tmp_path))
    assert code == 0 and "GB/s" in out
    stored = load_bandwidth(tmp_path)
    assert stored["read_bytes_per_second"] > 1e8  # any machine reads faster than 100 MB/s

    code, out = run_cli(capsys, "bench", "--model", str(model_path), "--threads", "1",
                        "--state-dir", str(tmp_path), *QUICK)
    assert code == 0
    assert "depth" in out and "tg tok/s" in out and "Q4_1" in out
    assert "roofline" in out and "% of it" in out


def test_kv_cache_bytes_follow_the_models_architecture(model_path):
    runner = InProcess(model_path, 1, BenchSpec(depths=[0], n_prompt=8, n_gen=8))
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dimensions; K and V in f16.
    assert roofline.kv_bytes_per_token(runner.metadata()) == 2 * 30 * 3 * 64 * 2


def test_threads_auto_sweeps_and_keeps_the_fastest(capsys, model_path, tmp_path):
    _, out = run_cli(capsys, "bench", "--model", str(model_path), "--threads", "auto",
                        "--state-dir", str(tmp_path), "--json", "--depth", "0",
                        "--n-prompt", "8", "--n-gen", "8", "--repetitions", "1")
    report = json.loads(out)
    rates = {int(k): v for k, v in report["threads_sweep"]["tg_tokens_per_second"].items()}
    assert sorted(rates) == list(range(1, len(rates) + 1))
    assert rates[report["threads"]] >= 0.98 * max(rates.values())


def test_throttling_during_a_run_marks_it_invalid(pi5_root):
    with Monitor(pi5_root, interval=0.05) as monitor:
        time.sleep(0.2)
    conditions = monitor.conditions.as_dict()
    assert conditions["valid"] is False
    assert "arm_frequency_capped" in conditions["invalid_reason"]
    assert "throttled" in conditions["invalid_reason"]
    assert conditions["throttle"]["before"] == "0x60006"
    assert conditions["soc_temperature_celsius"]["max"] == 81.25
    assert Conditions(throttle_now_during=0).invalid_reason is None
    # Bits 16-19 ("since boot") alone do not invalidate a run.
    assert "under_voltage" in Conditions(throttle_now_during=0x1).invalid_reason


def test_power_is_summed_over_the_pmic_rails():
    assert parse_pmic_adc(PMIC_SAMPLE) == pytest.approx(0.1 * 3.7 + 0.2 * 3.3 + 2.0 * 0.9)
    assert parse_pmic_adc("error=2 error_msg=\"Command not registered\"") is None


def test_a_verification_that_cannot_fit_the_context_is_a_config_error(model_path):
    for key in ("depth", "conversation_depth"):
        with pytest.raises(ConfigError) as error:
            validate({"model": {"path": str(model_path), "context": 512},
                      "verify": {key: 1024}}, "appliance.toml")
        assert "needs 1152 tokens" in str(error.value)
        assert "model.context = 512" in str(error.value)
    # Left at its default, the conversation's depth shrinks to what the context holds; the gate
    # stays where the published figures are measured.
    settings = validate({"model": {"path": str(model_path), "context": 512}}, "appliance.toml")
    assert settings.verify.depths == [0, 512 - 64 - 64]
    # An operator who wants the gate at depth sets it; one figure is then enough.
    settings = validate({"model": {"path": str(model_path)},
                         "verify": {"depth": 1024}}, "appliance.toml")
    assert settings.verify.depths == [1024]


def test_an_interrupted_write_leaves_the_previous_verdict(tmp_path, monkeypatch):
    state = tmp_path / "verify.json"
    write_result(state, {"result": "pass", "measured_tps": 9.1})

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_result(state, {"result": "fail", "measured_tps": 1.0})
    assert json.loads(state.read_text()) == {"result": "pass", "measured_tps": 9.1}
    assert [path.name for path in tmp_path.iterdir()] == ["verify.json"]


def test_health_waits_for_a_verification_of_this_very_instance(make_settings, shared_engine):
    settings = make_settings(verify={"enabled": True})
    client = create_app(settings, shared_engine).test_client()
    health = client.get("/health")
    assert (health.status_code, health.get_json()["status"]) == (503, "verifying")
    # A pass recorded for an earlier instance (before a restart) does not count.
    write_result(settings.verify_state_file, {"result": "pass", "instance_id": "an-earlier-one"})
    assert client.get("/health").get_json()["status"] == "verifying"


def wait_for_status(server, wanted: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, body = http_json(server.url + "/health", timeout=2)
            if body.get("status") == wanted:
                return body
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/health never said {wanted!r}:\n{server.output()}")


def verify_cli(server) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "verify", "--config", str(server.config),
         "--json"], capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_verification_that_passes_turns_verifying_into_ok(start_server, tmp_path):
    server = start_server(verify={**QUICK_VERIFY, "target_tps": 0.5})
    wait_for_status(server, "verifying")
    assert http_json(server.url + "/health")[0] == 503

    verified = verify_cli(server)
    assert verified.returncode == 0, verified.stderr
    result = json.loads(verified.stdout)
    assert result["result"] == "pass" and result["measured_tps"] > 0.5
    on_disk = json.loads((tmp_path / "verify.json").read_text())
    assert on_disk["instance_id"] == result["instance_id"]
    # Gated at depth 0, as llama-bench's tg128; the conversation's figure reported beside it.
    assert [row["depth"] for row in on_disk["report"]["results"]] == [0, 64]
    assert result["depth"] == 0 and result["conversation"]["depth"] == 64
    assert result["conversation"]["measured_tps"] > 0
    assert "at depth 64 (not gated)" in result["reason"]
    assert on_disk["model"]["sha256"] == SMOLLM2_SHA256

    status, health = http_json(server.url + "/health")
    assert (status, health["status"]) == (200, "ok")
    assert health["verification"]["measured_tps"] == result["measured_tps"]
    metrics = urllib_text(server.url + "/metrics")
    assert metric_value(metrics, "appliance_verification_passed") == 1
    gated = 'appliance_verification_tokens_per_second{depth="0",gated="true"}'
    assert metric_value(metrics, gated) == pytest.approx(result["measured_tps"])
    deeper = 'appliance_verification_tokens_per_second{depth="64",gated="false"}'
    assert metric_value(metrics, deeper) == pytest.approx(result["conversation"]["measured_tps"])
    # The verifier's own requests are not user traffic; a user's streamed request is.
    assert metric_value(metrics, "appliance_generated_tokens_total") == 0
    assert "/v1/completions" not in metrics
    user = Endpoint(server.url)
    user.stream_completion("Hello", max_tokens=5)
    metrics = urllib_text(server.url + "/metrics")
    assert metric_value(metrics, "appliance_generated_tokens_total") == 5
    assert 'appliance_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    assert "Traceback" not in server.output()


@pytest.mark.slow
@pytest.mark.parametrize(("on_fail", "status", "code"),
                         [("degraded", "degraded", 200), ("refuse", "refused", 503)])
def test_verification_below_target_degrades_or_refuses(start_server, on_fail, status, code):
    server = start_server(verify={**QUICK_VERIFY, "target_tps": 10_000, "on_fail": on_fail})
    wait_for_status(server, "verifying")
    verified = verify_cli(server)
    assert verified.returncode == 1, verified.stderr
    result = json.loads(verified.stdout)
    assert result["result"] == "fail" and "below the target 10000" in result["reason"]
    answer, health = http_json(server.url + "/health")
    assert (answer, health["status"]) == (code, status)
    assert "below the target" in health["reason"]


def test_verification_of_a_service_that_is_not_there_says_so(tmp_path, model_path):
    settings = write_settings(tmp_path, model_path, free_port())
    verified = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "verify", "--config", str(settings)],
        capture_output=True, text=True, timeout=60, check=False)
    assert verified.returncode == 69
    assert "could not measure" in verified.stdout and "not ready within 1 s" in verified.stdout
    assert json.loads((tmp_path / "verify.json").read_text())["result"] == "error"


@pytest.mark.slow
def test_a_plain_serve_verifies_itself_and_reaches_ok(start_server):
    """No unit, nobody running `pi-appliance verify`: the quick start still reaches ok."""
    server = start_server(verify={**QUICK_VERIFY, "target_tps": 0.5, "by": "service"})
    body = wait_for_status(server, "ok", timeout=120)
    assert body["verification"]["result"] == "pass"
    assert body["verification"]["instance_id"] == body["instance_id"]
    assert body["verification"]["measured_tps"] > 0.5


def write_settings(tmp_path: Path, model_path: Path, port: int) -> Path:
    return write_config(tmp_path / "appliance.toml", {
        "server": {"port": port}, "model": {"path": str(model_path), "context": 2048},
        "paths": {"state_dir": str(tmp_path)}, "verify": {"wait_seconds": 1},
    })


def urllib_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


@pytest.fixture
def two_model_store(tmp_path: Path) -> Path:
    """A model store holding SmolLM2 and Gemma 3 270M (installed last, so active)."""
    models = tmp_path / "models"
    for variant in ("smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m"):
        assert main(["model", "--models-dir", str(models), "install", variant]) == 0
    return models


def start_auto(start_server, tmp_path: Path, models: Path, target_tps: float):
    return start_server(
        model={"path": str(models / "active"), "policy": "auto"},
        paths={"state_dir": str(tmp_path), "models_dir": str(models)},
        verify={**QUICK_VERIFY, "target_tps": target_tps})


@pytest.mark.slow
def test_auto_policy_falls_back_to_a_faster_model_until_none_is_left(
        start_server, tmp_path, two_model_store):
    server = start_auto(start_server, tmp_path, two_model_store, target_tps=10_000)
    assert wait_for_status(server, "verifying")["model"]["id"] == "gemma-3-270m-q4_k_m"
    verified = verify_cli(server)
    assert verified.returncode == 1, verified.stderr
    result = json.loads(verified.stdout)
    [step] = result["fallback"]["attempts"]
    assert (step["from"], step["to"]) == ("gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1")
    assert step["measured_tps"] == result["measured_tps"] and step["predicted_tps"] > 0
    assert "switching to smollm2-135m-instruct-q4_1" in verified.stderr
    assert ModelStore(two_model_store).active().name == f"{SMOLLM2_SHA256}.gguf"
    # Monitoring sees the step at once; the restart is requested, not done, by the verifier.
    _, health = http_json(server.url + "/health")
    assert health["model_policy"]["fallback"]["attempts"][0]["to"] == step["to"]
    restart_flag = tmp_path / "restart-requested"
    assert restart_flag.exists()

    # What the verify unit's privileged ExecStartPost= does: restart the service.
    restart_flag.unlink()
    server.stop()
    restarted = start_auto(start_server, tmp_path, two_model_store, target_tps=10_000)
    body = wait_for_status(restarted, "verifying")
    assert body["model"]["id"] == "smollm2-135m-instruct-q4_1"
    assert body["model"]["sha256"] == SMOLLM2_SHA256
    again = json.loads(verify_cli(restarted).stdout)
    assert again["result"] == "fail" and len(again["fallback"]["attempts"]) == 1
    assert again["fallback"]["stopped"].startswith(
        "no variant faster than smollm2-135m-instruct-q4_1 fits")
    assert not restart_flag.exists()
    _, health = http_json(restarted.url + "/health")
    assert health["status"] == "degraded"
    assert health["model_policy"]["fallback"]["stopped"] == again["fallback"]["stopped"]


@pytest.mark.slow
def test_auto_policy_leaves_a_model_that_passes_alone(start_server, tmp_path, two_model_store):
    server = start_auto(start_server, tmp_path, two_model_store, target_tps=0.5)
    wait_for_status(server, "verifying")
    result = json.loads(verify_cli(server).stdout)
    assert result["result"] == "pass" and "fallback" not in result
    assert not (tmp_path / "fallback.json").exists()
    assert ModelStore(two_model_store).active().name.startswith("a5fd3b62")


def test_fallback_attempts_are_bounded_and_a_manual_choice_starts_afresh(
        make_settings, tmp_path, two_model_store):
    settings = make_settings(model={"path": str(two_model_store / "active"), "policy": "auto",
                                    "fallback_attempts": 1},
                             paths={"state_dir": str(tmp_path), "models_dir": str(two_model_store)})
    store = ModelStore(two_model_store)
    used = {"attempts": [{"from": "x", "to": "gemma-3-270m-q4_k_m"}],
            "active_sha256": store.active().name.removesuffix(".gguf")}
    settings.fallback_state_file.write_text(json.dumps(used))
    verdict = {"result": "fail", "measured_tps": 3.0, "reason": "below"}
    steps = fall_back(settings, verdict, progress=lambda message: None)
    assert steps["stopped"] == "all 1 fallback attempts are used; the model stays as it is"
    assert store.active().name.startswith("a5fd3b62")
    # A person activating another model is a new decision: the count starts again.
    store.activate(SMOLLM2_SHA256)
    assert fall_back(settings, verdict, lambda message: None)["stopped"].startswith(
        "no variant faster than smollm2")


def test_a_measurement_flagged_invalid_never_switches_the_model(make_settings, tmp_path,
                                                                two_model_store):
    settings = make_settings(model={"path": str(two_model_store / "active"), "policy": "auto"},
                             paths={"state_dir": str(tmp_path), "models_dir": str(two_model_store)})
    verdict = {"result": "fail", "measured_tps": 0.2, "reason": "below",
               "report": {"conditions": {"valid": False,
                                         "invalid_reason": "the SoC was throttled"}}}
    steps = fall_back(settings, verdict, progress=lambda message: None)
    assert steps["attempts"] == []
    assert steps["stopped"].startswith("this measurement is not valid (the SoC was throttled)")
    assert ModelStore(two_model_store).active().name.startswith("a5fd3b62")  # still Gemma
    assert not (tmp_path / "restart-requested").exists()


@pytest.mark.slow
def test_a_service_behind_an_api_key_is_verified_with_that_key(start_server, tmp_path,
                                                               monkeypatch):
    # As under systemd: the key is the unit's credential, named by no path in the config.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "api-key").write_text("k" * 40 + "\n")
    (credentials / "api-key").chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    server = start_server(verify={**QUICK_VERIFY, "target_tps": 0.5})
    wait_for_status(server, "verifying")
    assert http_json(server.url + "/v1/models")[0] == 401  # the key is really required
    verified = verify_cli(server)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["result"] == "pass"

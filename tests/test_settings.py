"""Configuration: typos and out-of-range values are all reported at once, with exit 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.exitcodes import ConfigError, ExitCode
from appliance.hardware.sysfs import physical_core_count
from appliance.settings import load_settings, validate


def config_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_config_check_accepts_a_good_file(tmp_path, model_path):
    good = tmp_path / "good.toml"
    good.write_text(f'[model]\npath = "{model_path}"\ncontext = 8192\n'
                    '[server]\nport = 9000\n[limits]\nqueue_size = 2\n')
    result = config_check(good)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "127.0.0.1:9000" in result.stdout


def test_config_check_lists_every_problem_with_path_value_and_rule(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nprot = 8080\nport = 70000\n'
        '[model]\npath = "/m.gguf"\nthreads = 0\nsha256 = "abc"\n'
        '[limits]\nmax_tokens = 100\ndefault_max_tokens = 500\n'
        '[extra]\nx = 1\n')
    result = config_check(bad)
    assert result.returncode == ExitCode.CONFIG_INVALID
    lines = result.stderr
    assert "server.prot: unknown key (value 8080)" in lines
    assert "server.port = 70000: Input should be less than or equal to 65535" in lines
    assert "model.threads = 0: Input should be greater than or equal to 1" in lines
    assert "model.sha256 = 'abc': must be 64 hexadecimal digits" in lines
    assert "limits.default_max_tokens = 500: must not exceed limits.max_tokens (100)" in lines
    assert "6 problem(s)" in lines
    assert "extra: unknown key" in lines


def test_an_auto_model_policy_needs_the_verify_unit(tmp_path, model_path):
    """The fallback's restart is the verify unit's job: a service verifying itself cannot."""
    config = tmp_path / "auto.toml"
    # A small context too, where the verification's depth is fitted to it.
    config.write_text(f'[model]\npath = "{model_path}"\npolicy = "auto"\ncontext = 512\n')
    result = config_check(config)
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert 'model.policy = "auto" needs verify.by = "unit"' in result.stderr
    config.write_text(f'[model]\npath = "{model_path}"\npolicy = "auto"\n[verify]\nby = "unit"\n')
    assert config_check(config).returncode == 0


def test_config_check_reports_broken_toml(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\npath = 1\n")
    result = config_check(broken)
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "not valid TOML" in result.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    result = config_check(tmp_path / "absent.toml")
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "not found" in result.stderr


def test_command_line_overrides_the_file(tmp_path, model_path, monkeypatch):
    config = tmp_path / "a.toml"
    config.write_text(f'[model]\npath = "{model_path}"\nthreads = 3\n[server]\nport = 9000\n')
    settings = load_settings(config, {"server": {"port": 9100, "host": None},
                                      "model": {"threads": None, "context": 1024}})
    assert settings.server.port == 9100
    assert settings.model.threads == 3
    assert settings.model.context == 1024


def test_environment_names_the_config_file(tmp_path, model_path, monkeypatch):
    config = tmp_path / "env.toml"
    config.write_text(f'[model]\npath = "{model_path}"\n')
    monkeypatch.setenv("PI_APPLIANCE_CONFIG", str(config))
    assert load_settings(None).model.path == model_path
    monkeypatch.setenv("PI_APPLIANCE_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(None, {"model": {"path": str(model_path)}}, require_file=False)


def test_quick_start_needs_no_file_and_leaves_threads_to_measurement(model_path, monkeypatch):
    monkeypatch.delenv("PI_APPLIANCE_CONFIG", raising=False)
    monkeypatch.setattr("appliance.settings.DEFAULT_CONFIG_PATH", Path("/nonexistent.toml"))
    settings = load_settings(None, {"model": {"path": str(model_path)}}, require_file=False)
    assert settings.model.threads is None  # the engine times 1…physical cores and keeps one
    assert physical_core_count() <= len(os.sched_getaffinity(0))


def test_a_quantized_kv_cache_needs_flash_attention(model_path):
    with pytest.raises(ConfigError, match=r"needs model\.flash_attention = true"):
        validate({"model": {"path": str(model_path), "kv_cache_type": "q8_0",
                            "flash_attention": False}}, "appliance.toml")
    settings = validate({"model": {"path": str(model_path), "kv_cache_type": "q8_0"}}, "x")
    assert settings.model.flash_attention and settings.model.kv_cache_type == "q8_0"


def test_physical_cores_ignore_smt_siblings(tmp_path):
    for cpu in os.sched_getaffinity(0):
        topology = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{cpu // 2}\n")  # two threads per core
    cpus = len(os.sched_getaffinity(0))
    assert physical_core_count(tmp_path) == len({cpu // 2 for cpu in os.sched_getaffinity(0)})
    assert physical_core_count(tmp_path) <= cpus


def test_the_api_key_comes_from_the_units_credential_when_the_file_names_none(
        tmp_path, monkeypatch):
    (tmp_path / "api-key").write_text("k" * 32)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = validate({"server": {"host": "0.0.0.0"}, "model": {"path": "/m.gguf"}}, "test")
    assert settings.server.api_key_file == tmp_path / "api-key"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"server\.api_key_file.*not a loopback address"):
        validate({"server": {"host": "0.0.0.0"}, "model": {"path": "/m.gguf"}}, "test")


def test_the_kv_cache_types_are_the_same_for_the_setting_the_engine_and_the_planner():
    from typing import get_args

    from appliance.models.catalog import KV_ELEMENT_BYTES
    from appliance.service.loading import KV_CACHE_GGML_TYPES
    from appliance.settings import ModelSettings

    offered = set(get_args(ModelSettings.model_fields["kv_cache_type"].annotation))
    assert offered == set(KV_CACHE_GGML_TYPES) == set(KV_ELEMENT_BYTES)

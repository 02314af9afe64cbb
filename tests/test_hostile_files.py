"""Hostile and broken files on the device: configuration, key file, model paths and the store.
Each is refused with what was wrong and what to do, and nothing that worked is lost."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.cli.main import build_parser
from appliance.exitcodes import ConfigError, ExitCode
from appliance.settings import read_api_key, validate

KEY = "k" * 32


def config_check(path: Path, *options: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "check", *options, str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def key_file(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "api-key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    return path


def config_with(directory: Path, model: Path, server: str = "") -> Path:
    path = directory / "appliance.toml"
    path.write_text(f'[model]\npath = "{model}"\n[server]\n{server}')
    return path


# ---- config check makes the checks serve makes -------------------------------------------------

def test_config_check_refuses_a_missing_model_unless_told_it_comes_later(tmp_path):
    config = config_with(tmp_path, tmp_path / "absent.gguf")
    refused = config_check(config)
    assert refused.returncode == ExitCode.MODEL_MISSING
    assert "absent.gguf: model file not found" in refused.stderr
    later = config_check(config, "--without-model")
    assert later.returncode == 0, later.stderr
    assert "not checked" in later.stdout


def test_config_check_refuses_a_file_that_is_no_gguf(tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model\n" * 100)
    result = config_check(config_with(tmp_path, bogus))
    assert result.returncode == ExitCode.MODEL_INVALID
    assert "notes.gguf" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_key_file_others_may_use_is_refused_with_the_chmod_to_run(tmp_path, model_path, mode):
    key = key_file(tmp_path, mode)
    result = config_check(config_with(tmp_path, model_path, f'api_key_file = "{key}"\n'))
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert f"mode {mode:04o}" in result.stderr and f"chmod 600 {key}" in result.stderr


def test_a_key_file_that_is_a_pipe_is_refused_at_once_not_read_for_ever(tmp_path, model_path):
    pipe = tmp_path / "api-key"
    os.mkfifo(pipe, 0o600)
    result = config_check(config_with(tmp_path, model_path, f'api_key_file = "{pipe}"\n'))
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "not a regular file" in result.stderr


def test_a_key_file_owned_by_another_user_is_refused(tmp_path):
    key = key_file(tmp_path)
    os.chown(key, 65534, 65534)  # nobody: it could rewrite the key, or hand it out
    with pytest.raises(ConfigError, match="owned by nobody, not by root"):
        read_api_key(key)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_access (version 2)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF


def set_acl(path: Path, *entries: tuple[int, int, int]) -> None:
    try:
        os.setxattr(path, "system.posix_acl_access", _acl(*entries))
    except OSError as error:
        pytest.skip(f"this file system takes no ACLs ({error.strerror})")


def test_a_key_shared_with_another_user_by_an_acl_is_refused(tmp_path):
    key = key_file(tmp_path)
    set_acl(key, (USER_OBJ, 6, UNDEFINED_ID), (USER, 4, 65534), (GROUP_OBJ, 0, UNDEFINED_ID),
            (MASK, 4, UNDEFINED_ID), (OTHER, 0, UNDEFINED_ID))
    with pytest.raises(ConfigError, match="its ACL lets other users"):
        read_api_key(key)


def test_a_credential_as_systemd_passes_it_is_accepted(tmp_path):
    # systemd: root's file, mode 0400, read access for the service's user by an ACL (here this
    # process's user, root); `stat` shows 0440 through the mask.
    key = key_file(tmp_path, 0o400)
    set_acl(key, (USER_OBJ, 4, UNDEFINED_ID), (USER, 4, os.geteuid()),
            (GROUP_OBJ, 0, UNDEFINED_ID), (MASK, 4, UNDEFINED_ID), (OTHER, 0, UNDEFINED_ID))
    assert read_api_key(key) == KEY.encode()


# ---- the configuration file itself -----------------------------------------------------------

def test_a_configuration_that_is_not_utf8_names_its_line(tmp_path, model_path):
    config = tmp_path / "appliance.toml"
    config.write_bytes(f'[model]\npath = "{model_path}"\nid = "caf\xe9"\n'.encode("latin-1"))
    result = config_check(config)
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "line 3 is not UTF-8" in result.stderr and "0xe9" in result.stderr


def test_a_directory_given_as_the_configuration_says_so(tmp_path):
    result = config_check(tmp_path)
    assert result.returncode == ExitCode.CONFIG_INVALID
    assert "a directory, not a configuration file" in result.stderr


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("model.path", "models/active", "must be an absolute path"),
    ("model.path", "/var/lib/pi-llm-appliance/models/../../../etc/shadow", "must not contain '..'"),
    ("paths.state_dir", "state", "must be an absolute path"),
    ("paths.models_dir", "/srv/../tmp", "'/tmp'"),
])
def test_relative_and_dotted_paths_are_refused(setting, value, words):
    section, name = setting.split(".")
    data: dict = {"model": {"path": "/m.gguf"}}
    data.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError, match=words):
        validate(data, "test")


def test_serve_takes_a_relative_path_on_the_command_line_as_the_shell_means_it(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--model", "here.gguf", "--api-key-file", "key"])
    assert (args.model, args.api_key_file) == (tmp_path / "here.gguf", tmp_path / "key")


def test_a_queue_that_would_take_every_http_thread_is_refused_with_both_fixes():
    with pytest.raises(ConfigError) as refused:
        validate({"model": {"path": "/m.gguf"}, "server": {"http_threads": 4},
                  "limits": {"queue_size": 3}}, "test")
    message = str(refused.value)
    assert "lower limits.queue_size to 2 or raise server.http_threads to 5" in message
    validate({"model": {"path": "/m.gguf"}, "server": {"http_threads": 4},
              "limits": {"queue_size": 2}}, "test")


# ---- the model store -----------------------------------------------------------------------

def test_a_checksum_that_is_a_path_is_refused_before_anything_is_written(tmp_path, model_path,
                                                                         capsys):
    models = tmp_path / "models"
    code = main(["model", "--models-dir", str(models), "install", str(model_path),
                 "--sha256", "../../outside"])
    assert code == ExitCode.USAGE
    assert "must be 64 hexadecimal digits" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.rglob("*")) == []


def test_installing_from_a_pipe_is_refused_at_once(tmp_path, capsys):
    pipe = tmp_path / "model.gguf"
    os.mkfifo(pipe)
    code = main(["model", "--models-dir", str(tmp_path / "models"), "install", str(pipe),
                 "--trust-unverified"])
    assert code == ExitCode.MODEL_MISSING
    assert "not a regular file" in capsys.readouterr().err


def test_model_list_shows_a_partial_download_and_an_active_link_to_a_missing_model(
        tmp_path, capsys):
    models = tmp_path / "models"
    (models / ".partial").mkdir(parents=True)
    (models / ".partial" / f"{'a' * 64}.part").write_bytes(b"\0" * 1000)
    (models / "active").symlink_to(f"{'b' * 64}.gguf")
    assert main(["model", "list", "--models-dir", str(models)]) == 0
    listing = capsys.readouterr().out
    assert f"problem  .partial/{'a' * 64}.part: partial download" in listing
    assert "problem  active: links to" in listing and "the service cannot start" in listing

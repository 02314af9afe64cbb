"""Monitoring as a fleet's operators plug it in: `fleet prometheus-config`'s files, its alert rules
under promtool, and a real Prometheus (Debian's) scraping a running appliance."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from appliance.fleet import prometheus
from tests.helpers import free_port, http_json, run_fleet, write_appliances_inventory

REPOSITORY = Path(__file__).resolve().parents[1]
RULES = REPOSITORY / "appliance/fleet/data/alert-rules.yml"
DASHBOARD = REPOSITORY / "appliance/fleet/data/grafana-dashboard.json"
KEY = "monitoring-test-key-" + "k" * 24


def test_the_alert_rules_pass_promtool_and_fire_as_their_unit_tests_say(tmp_path):
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    shutil.copy(RULES, tmp_path / "alert-rules.yml")
    shutil.copy(REPOSITORY / "tests/monitoring/alert-rules-test.yml", tmp_path)
    tested = subprocess.run(["promtool", "test", "rules", "alert-rules-test.yml"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # One test per rule: each rule is named by an expectation.
    tests = (tmp_path / "alert-rules-test.yml").read_text()
    import yaml

    alerts = [rule["alert"] for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
    assert [alert for alert in alerts if f"alertname: {alert}" not in tests] == []


def test_the_config_comes_from_the_inventory_and_never_holds_the_key(tmp_path):
    inventory = write_appliances_inventory(tmp_path / "hosts.yml", {
        "pi-a": {"ansible_host": "192.0.2.10", "service_host": "0.0.0.0"},
        "pi-b": {"ansible_host": "192.0.2.11", "service_port": 9000,
                 "service_host": "192.0.2.11"},
        "pi-c": {"ansible_host": "192.0.2.12"}})
    keys = tmp_path / "keys"
    keys.mkdir()
    for host in ("pi-a", "pi-b"):
        (keys / host).write_text(KEY + host)
    out = tmp_path / "out"
    result = run_fleet("prometheus-config", "-i", str(inventory), "--limit", "pi-a:pi-b:pi-c",
                   "-o", str(out), "--keys-dir", str(keys))
    assert result.returncode == 0, result.stderr
    targets = {path.stem: json.loads(path.read_text())
               for path in (out / prometheus.TARGETS_DIR).iterdir()}
    assert targets == {
        "pi-a": [{"targets": ["192.0.2.10:8080"], "labels": {"host": "pi-a"}}],  # the default
        "pi-b": [{"targets": ["192.0.2.11:9000"], "labels": {"host": "pi-b"}}],
        "pi-c": [{"targets": ["192.0.2.12:8080"], "labels": {"host": "pi-c"}}]}
    # pi-c keeps the default loopback binding and has no key: the operator is told both.
    assert "pi-c listens on loopback only" in result.stderr
    assert f"no API key in {keys} for pi-c;" in result.stderr
    files = [path for path in out.rglob("*") if path.is_file()]
    assert not any(KEY in path.read_text() for path in files)
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {"0o644"}
    scrape = (out / prometheus.SCRAPE_CONFIG_FILE).read_text()
    # Each Pi has its own key, so each its own job, all labelled job="pi-llm-appliance".
    assert f"credentials_file: {keys / 'pi-b'}" in scrape
    assert scrape.count("replacement: pi-llm-appliance}") == 3
    (keys / "pi-c").write_text(KEY + "pi-c")  # as the note says; promtool needs every key
    checked = subprocess.run(["promtool", "check", "config",
                              str(tmp_path / "out" / prometheus.SCRAPE_CONFIG_FILE)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_bad_inventory_is_refused_saying_what_is_wrong(tmp_path):
    inventory = write_appliances_inventory(tmp_path / "hosts.yml",
                                           {"pi-a": {"service_port": "eighty"}})
    result = run_fleet("prometheus-config", "-i", str(inventory), "-o", str(tmp_path / "out"))
    assert result.returncode == 78
    assert "inventory host pi-a" in result.stderr and "port numbers" in result.stderr
    assert not (tmp_path / "out").exists()
    none = run_fleet("prometheus-config", "-i", str(inventory), "--limit", "nothing-such",
                 "-o", str(tmp_path / "out"))
    assert none.returncode == 78 and "matches 'nothing-such'" in none.stderr


def _query(url: str, expression: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expression}), timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"]]


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_appliance_and_every_dashboard_panel_has_data(
        start_server, tmp_path, pi5_root):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    (tmp_path / "models").mkdir()
    server = start_server(server={"api_key_file": str(key_file)},
                          paths={"hardware_root": str(pi5_root),
                                 "models_dir": str(tmp_path / "models")})
    server.wait_ready()
    (tmp_path / "verify.json").write_text(json.dumps({
        "result": "pass", "measured_tps": 9.1, "depth": 0, "target_tps": 8.0,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    inventory = write_appliances_inventory(tmp_path / "hosts.yml", {"pi-a": {
        "ansible_host": "127.0.0.1", "service_port": server.port, "service_host": "127.0.0.1"}})
    out = tmp_path / "prometheus"
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "pi-a").write_text(KEY)
    result = run_fleet("prometheus-config", "-i", str(inventory), "-o", str(out),
                   "--keys-dir", str(keys), "--scrape-interval", "1s")
    assert result.returncode == 0, result.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        scraper = subprocess.Popen(
            ["prometheus", f"--config.file={out / prometheus.SCRAPE_CONFIG_FILE}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and scraper.poll() is None:
            try:
                if _query(url, 'up{job="pi-llm-appliance",host="pi-a"} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the target never came up:\n"
                                 + (tmp_path / "prometheus.log").read_text()[-3000:])
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(3):  # traffic the rates and quantiles see, scraped between requests
            status, _ = http_json(server.url + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
                headers=headers)
            assert status == 200
            time.sleep(2)
        time.sleep(3)
        assert _query(url, 'appliance_build_info{host="pi-a"}')
        empty = [title for title, expression in panel_queries()
                 if not _query(url, expression.replace("$__rate_interval", "30s")
                               .replace("$host", ".*"))]
        assert empty == [], "panels without data"
        # The scrape is clean: no parse warnings from the Content-Type or the text.
        assert "duplicate parameter" not in (tmp_path / "prometheus.log").read_text()
    finally:
        scraper.terminate()
        scraper.wait(20)


def test_every_metric_the_service_exports_is_documented_and_nothing_more(make_settings,
                                                                         shared_engine, pi5_root,
                                                                         tmp_path):
    import re

    from appliance.service.app import create_app

    settings = make_settings(paths={"hardware_root": str(pi5_root),
                                    "models_dir": str(tmp_path)})
    (tmp_path / "verify.json").write_text(json.dumps({
        "result": "pass", "measured_tps": 9.0, "depth": 0, "target_tps": 8.0,
        "timestamp": "2026-12-01T10:00:00Z"}))
    client = create_app(settings, shared_engine).test_client()
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).close()
    text = client.get("/metrics").get_data(as_text=True)
    exported = set(re.findall(r"^# TYPE (appliance_\w+) ", text, re.MULTILINE))
    documented = set(re.findall(r"^\| `(appliance_\w+)`",
                                (REPOSITORY / "docs/monitoring.md").read_text(), re.MULTILINE))
    only_while_busy = {"appliance_engine_last_progress_timestamp_seconds"}
    assert exported - documented == set(), "exported, not in docs/monitoring.md"
    assert documented - exported == only_while_busy, "in docs/monitoring.md, not exported"

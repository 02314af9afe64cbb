"""The tree reads like the architecture and each value has one source: imports point down the
layers, the device never imports the control machine's code, tests share helpers through one
module, and every generated file is current."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import appliance
from appliance import layout

REPOSITORY = Path(__file__).resolve().parents[1]
# Bottom to top: a module may import its own layer and those below it, never one above.
LAYERS = [
    ["appliance", "appliance.exitcodes"],
    ["appliance.util", "appliance.layout"],
    ["appliance.hardware"],
    ["appliance.settings"],
    ["appliance.models"],
    ["appliance.service"],
    ["appliance.planning"],
    ["appliance.verification"],
    ["appliance.fleet"],  # the control machine's, but on the CLI; fabric imported when used
    ["appliance.cli"],
]
# The control machine's builder runs from the collection with nothing installed: the bottom
# layers only (standard library).
CONTROL_MAY_IMPORT = {"appliance", "appliance.exitcodes", "appliance.util", "appliance.layout",
                      "appliance.control"}


def layer_of(module: str) -> int:
    best = max((prefix for row in LAYERS for prefix in row
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(index for index, row in enumerate(LAYERS) if best in row)


def appliance_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("appliance"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("appliance")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted((REPOSITORY / "appliance").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: module_name(path))
def test_imports_point_down_the_layers_and_never_into_the_control_side(path):
    module = module_name(path)
    imported = appliance_imports(path)
    if module.startswith("appliance.control"):
        assert {name for name in imported if not any(
            name == allowed or name.startswith(allowed + ".") for allowed in
            CONTROL_MAY_IMPORT - {"appliance"}) and name != "appliance"} == set()
        return
    assert not [name for name in imported if name.startswith("appliance.control")]
    upward = [name for name in imported if layer_of(name) > layer_of(module)]
    assert upward == [], f"{module} imports a layer above it"


def test_no_test_imports_another_test_file():
    for path in (REPOSITORY / "tests").glob("*.py"):
        imported = {name.removeprefix("tests.").lstrip(".") for name in
                    (node.module for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module)
                    if name.startswith(("tests.", "."))}
        tests_imported = {name for name in imported if name.startswith(("test_", "conftest"))}
        assert not tests_imported, f"{path.name} imports {tests_imported}"  # helpers only


def test_one_version_for_the_package_and_the_collection():
    galaxy = yaml.safe_load((REPOSITORY / "galaxy.yml").read_text())
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert galaxy["version"] == appliance.__version__ and "version" in project["dynamic"]


def test_the_packaged_units_name_the_layout():
    data = REPOSITORY / "appliance/data"
    assert sorted(layout.UNITS) == sorted(path.name for path in data.iterdir()
                                          if path.suffix in (".service", ".timer"))
    # systemd cannot read the layout file: the units are held to it here.
    for unit in ("pi-llm-appliance.service", "pi-llm-appliance-verify.service"):
        text = (data / unit).read_text()
        for value in (f"User={layout.SERVICE_USER}", f"ExecStart={layout.VENV}/bin/pi-appliance",
                      f"--config {layout.CONFIG_FILE}", f"api-key:{layout.API_KEY_FILE}",
                      f"StateDirectory={layout.STATE_DIR.name}"):
            assert value in text, f"{unit}: {value}"
    assert Path("/var/lib") / layout.STATE_DIR.name == layout.STATE_DIR
    assert layout.CONFIG_FILE.parent == Path("/etc") / layout.SERVICE_USER


def test_the_roles_read_the_layout_and_the_build_from_the_package_files():
    # Paths and pins appear in the roles only through the common role's lookups.
    written = json.loads((REPOSITORY / "appliance/data/layout.json").read_text())
    pins = json.loads((REPOSITORY / "appliance/data/llama-cpp.json").read_text())
    for path in (REPOSITORY / "roles").rglob("*"):
        if path.is_file() and path.suffix in (".yml", ".j2") and "README" not in path.name:
            text = "\n".join(line for line in path.read_text().splitlines()
                             if not line.lstrip().startswith("#"))
            for value in (written["prefix"], written["state_dir"], written["config_dir"],
                          *pins["sdist_sha256"].values()):
                assert value not in text, f"{path.relative_to(REPOSITORY)} writes {value}"


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPOSITORY / "scripts/generate_docs.py"), *args],
                          capture_output=True, text=True, check=False)


def test_every_generated_file_is_current():
    result = generate("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_stale_role_readme_or_example_inventory_is_caught(tmp_path):
    for name in ("roles", "inventory", "README.md"):
        source = REPOSITORY / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, tmp_path / name)
    spec = tmp_path / "roles/swap/meta/argument_specs.yml"
    spec.write_text(spec.read_text().replace("zram size as a percentage of RAM.",
                                             "zram size, in percent of RAM."))
    result = generate("--check", "--root", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "stale: roles/swap/README.md (run scripts/generate_docs.py)",
        "stale: inventory/example/group_vars/appliances.yml (run scripts/generate_docs.py)"]

"""What the control machine builds once for a whole fleet of Pi 5s (the `llama_cpp` and `service`
roles' artifact mode): 50 Pis must not compile 50 times, nor each download from PyPI.

- llama.cpp cross-built for the Cortex-A76 (`llamacpp.ensure_build`), packed as a tarball;
- a wheelhouse for the appliance's virtualenv on Debian 12 arm64 (CPython 3.11): the appliance's
  own wheel, llama-cpp-python's Python package (its native library is the llama.cpp above,
  found through LLAMA_CPP_LIB_PATH), and every dependency as a manylinux aarch64 wheel.
  systemd-python is Debian's python3-systemd (it has no wheels; the virtualenv sees it).

Builds are reproducible (SOURCE_DATE_EPOCH), so an unchanged artifact is byte-identical and a
re-run of the playbook copies nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from appliance.control import llamacpp
from appliance.control.host import SOURCE, cache_dir, run

TARGET_PYTHON = "3.11"  # Debian 12 / Raspberry Pi OS Bookworm
TARGET_PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64",
                    "linux_aarch64")
# The appliance's runtime dependencies, besides llama-cpp-python and systemd-python.
DEPENDENCIES = ("flask", "pydantic", "waitress", "prometheus-client", "numpy", "diskcache",
                "jinja2", "typing-extensions")
REPRODUCIBLE = {"SOURCE_DATE_EPOCH": "315532800"}  # 1980-01-01: the earliest a zip can hold


def _pinned(name: str) -> str:
    """name==version as this (tested) environment has it, so the Pi runs what the tests ran."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def llama_cpp_tarball(version: str) -> Path:
    prefix = llamacpp.ensure_build(version)
    tarball = prefix.with_name(prefix.name + ".tar.gz")
    if not tarball.exists():
        staging = tarball.with_suffix(".partial")
        with tarfile.open(staging, "w:gz") as archive:
            # BUILD.json last: the Pi takes it as the stamp of a complete unpack.
            last_the_stamp = sorted(prefix.rglob("*"), key=lambda p: (p.name == "BUILD.json", p))
            for path in last_the_stamp:
                info = archive.gettarinfo(path, str(path.relative_to(prefix)))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                if info.isreg():
                    with open(path, "rb") as handle:
                        archive.addfile(info, handle)
                else:
                    archive.addfile(info)
        staging.rename(tarball)
    return tarball


def _download_dependencies(wheelhouse: Path, requirements: list[str]) -> None:
    platforms = [argument for platform in TARGET_PLATFORMS for argument in ("--platform", platform)]
    run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
        "--python-version", TARGET_PYTHON, "--implementation", "cp", "--dest", wheelhouse,
        *requirements)


def _build_wheel(source: str | Path, wheelhouse: Path, extra_env: dict[str, str]) -> None:
    env = {**os.environ, **REPRODUCIBLE, **extra_env}
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
        "--wheel-dir", wheelhouse, str(source), env=env)


def wheelhouse(version: str) -> Path:
    """Dependencies and llama-cpp-python are cached by their pins; the appliance's own wheel is
    rebuilt every time (it is the code under development), reproducibly."""
    requirements = sorted(_pinned(name) for name in DEPENDENCIES)
    digest = hashlib.sha256(json.dumps([version, requirements, TARGET_PLATFORMS]).encode())
    house = cache_dir() / "wheelhouse" / f"cp311-aarch64-{digest.hexdigest()[:12]}"
    if not (house / ".complete").exists():
        house.mkdir(parents=True, exist_ok=True)
        _download_dependencies(house, requirements)
        _build_wheel(llamacpp.sdist(version), house, {
            # Python code only: the library is the cross-built llama.cpp.
            "CMAKE_ARGS": "-DLLAMA_BUILD=OFF", "_PYTHON_HOST_PLATFORM": "linux-aarch64"})
        (house / ".complete").write_text("")
    for old in house.glob("pi_llm_appliance-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as build:
        # Build from a copy: setuptools writes build/ and egg-info next to the sources.
        run("cp", "-r", "--", *[str(SOURCE / name) for name in
                                ("pyproject.toml", "README.md", "appliance")], build)
        _build_wheel(build, house, {})
    return house


ARTIFACTS = ("llama-cpp", "wheelhouse")


def build(which: tuple[str, ...] = ARTIFACTS) -> dict[str, str]:
    """Build the artifacts named (each role asks only for its own) and say where they are."""
    version = llamacpp.pinned_version()
    built = {"llama_cpp_python_version": version}
    if "llama-cpp" in which:
        built["llama_cpp_tarball"] = str(llama_cpp_tarball(version))
    if "wheelhouse" in which:
        built["wheelhouse"] = str(wheelhouse(version))
    return built

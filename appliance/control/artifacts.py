"""What the control machine builds once for a whole fleet of Pi 5s (the `llama_cpp` and `service`
roles' artifact mode): 50 Pis must not compile 50 times, nor each download from PyPI.

- llama.cpp cross-built for the Cortex-A76 (`llamacpp.ensure_build`), packed as a tarball;
- a wheelhouse for the appliance's virtualenv per CPython version of the fleet's Pis (3.13 on
  Raspberry Pi OS Trixie, 3.11 on Bookworm): the appliance's own wheel, llama-cpp-python's
  Python package (its native library is the llama.cpp above, found through LLAMA_CPP_LIB_PATH),
  and every dependency as a manylinux aarch64 wheel for that version. systemd-python is Debian's
  python3-systemd (it has no wheels; the virtualenv sees it).

Builds are reproducible (SOURCE_DATE_EPOCH), so an unchanged artifact is byte-identical and a
re-run of the playbook copies nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from appliance.control import llamacpp
from appliance.control.host import SOURCE, HostError, cache_dir, pin, pins, run
from appliance.util import sha256_of_file

TARGET_PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64",
                    "linux_aarch64")
# The appliance's runtime dependencies, besides llama-cpp-python and systemd-python; they and
# theirs at constraints.txt's pins (the tests' own virtualenv is installed from the same file).
DEPENDENCIES = ("flask", "pydantic", "waitress", "prometheus-client", "numpy", "diskcache",
                "jinja2", "typing-extensions")
REPRODUCIBLE = {"SOURCE_DATE_EPOCH": "315532800"}  # 1980-01-01: the earliest a zip can hold


def pack(directory: Path, tarball: Path, compression: str = "") -> Path:
    """`directory`'s files as a reproducible tar (no dates, no owners), written only when its
    bytes would change, so the playbook's checksum comparison copies nothing otherwise. A file
    named BUILD.json goes last: the Pi takes it as the stamp of a complete unpack."""
    staging = tarball.with_name(tarball.name + ".partial")
    with tarfile.open(staging, f"w:{compression}") as archive:
        for path in sorted(directory.rglob("*"), key=lambda p: (p.name == "BUILD.json", p)):
            if path.name.startswith("."):  # the cache's own stamps
                continue
            info = archive.gettarinfo(path, str(path.relative_to(directory)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            if info.isreg():
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
            else:
                archive.addfile(info)
    if tarball.exists() and sha256_of_file(tarball) == sha256_of_file(staging):
        staging.unlink()
    else:
        staging.rename(tarball)
    return tarball


def llama_cpp_tarball(version: str) -> Path:
    prefix = llamacpp.ensure_build(version)
    tarball = prefix.with_name(prefix.name + ".tar.gz")
    return tarball if tarball.exists() else pack(prefix, tarball, "gz")


def _download_dependencies(wheelhouse: Path, python: str, requirements: list[str]) -> None:
    platforms = [argument for platform in TARGET_PLATFORMS for argument in ("--platform", platform)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        # Transitive dependencies at their pins too.
        constraints.write("".join(f"{name}=={version}\n" for name, version in pins().items()))
        constraints.flush()
        run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            *platforms, "--python-version", python, "--implementation", "cp",
            "--constraint", constraints.name, "--dest", wheelhouse, *requirements)


def _build_wheel(source: str | Path, wheelhouse: Path, extra_env: dict[str, str]) -> None:
    env = {**os.environ, **REPRODUCIBLE, **extra_env}
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
        "--wheel-dir", wheelhouse, str(source), env=env)


def _check_python(python: str) -> None:
    major, _, minor = python.partition(".")
    if not (major == "3" and minor.isdigit()):
        raise HostError(f"--python {python}: give the Pi's CPython version as 3.N, e.g. 3.13")


def wheelhouse(version: str, python: str, appliance_wheel: Path) -> Path:
    """The wheelhouse for CPython `python` on aarch64, as one tar: a copy of one file is one
    module run on the Pi, where a directory of wheels is two per wheel (minutes under
    emulation). Dependencies and llama-cpp-python are cached by their pins; the appliance's own
    wheel is the one just built."""
    _check_python(python)
    requirements = sorted(f"{name}=={pin(name)}" for name in DEPENDENCIES)
    digest = hashlib.sha256(json.dumps([version, pins(), TARGET_PLATFORMS]).encode())
    tag = f"cp{python.replace('.', '')}-aarch64"
    house = cache_dir() / "wheelhouse" / f"{tag}-{digest.hexdigest()[:12]}"
    house.parent.mkdir(parents=True, exist_ok=True)
    with open(house.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second reuses the first's
        if not (house / ".complete").exists():
            house.mkdir(exist_ok=True)
            _download_dependencies(house, python, requirements)
            _build_wheel(llamacpp.sdist(version), house, {
                # Python code only: the library is the cross-built llama.cpp.
                "CMAKE_ARGS": "-DLLAMA_BUILD=OFF", "_PYTHON_HOST_PLATFORM": "linux-aarch64"})
            (house / ".complete").write_text("")
            for older in house.parent.glob(f"{tag}-*"):  # of other pins: never used again
                if older.is_dir() and older != house:
                    shutil.rmtree(older, ignore_errors=True)
                elif older.is_file() and older.name != f"{house.name}.tar":
                    older.unlink()
        for old in house.glob("pi_llm_appliance-*.whl"):
            old.unlink()
        shutil.copy2(appliance_wheel, house / appliance_wheel.name)
        return pack(house, house.with_name(f"{house.name}.tar"))


def _build_appliance_wheel(directory: Path) -> Path:
    """The appliance's own wheel, rebuilt every time (it is the code under development),
    reproducibly: unchanged code gives the same bytes."""
    with tempfile.TemporaryDirectory() as build:
        # Build from a copy: setuptools writes build/ and egg-info next to the sources.
        run("cp", "-r", "--", *[str(SOURCE / name) for name in
                                ("pyproject.toml", "README.md", "appliance")], build)
        _build_wheel(build, directory, {})
    [wheel] = directory.glob("pi_llm_appliance-*.whl")
    return wheel


ARTIFACTS = ("llama-cpp", "wheelhouse")


def build(which: tuple[str, ...] = ARTIFACTS, pythons: tuple[str, ...] = ()) -> dict:
    """Build the artifacts named (each role asks only for its own), the wheelhouse for each
    CPython version in `pythons`, and say where they are."""
    version = llamacpp.pinned_version()
    built: dict = {"llama_cpp_python_version": version}
    if "llama-cpp" in which:
        built["llama_cpp_tarball"] = str(llama_cpp_tarball(version))
    if "wheelhouse" in which:
        if not pythons:
            raise HostError("which Python does the wheelhouse serve? add --python 3.N for each "
                            "CPython version on the Pis (3.13 on Trixie, 3.11 on Bookworm)")
        for python in pythons:
            _check_python(python)
        with tempfile.TemporaryDirectory() as scratch:
            appliance_wheel = _build_appliance_wheel(Path(scratch))
            built["wheelhouses"] = {python: str(wheelhouse(version, python, appliance_wheel))
                                    for python in sorted(set(pythons))}
    return built

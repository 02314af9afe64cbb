"""The virtual Raspberry Pi 5: boots arm64 Debian under systemd, reachable over SSH, looks like a Pi
5 to whatever reads the board facts, enforces the Cortex-A76 instruction set, and cleans up."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualpi import disk, isa, network
from virtualpi.host import BINFMT_DIR, ensure_binfmt
from virtualpi.instance import Instance

from appliance.control import llamacpp

pytestmark = pytest.mark.virtual_pi

REPOSITORY = Path(__file__).resolve().parents[1]
VIRTUAL_PI = REPOSITORY / "testbed" / "virtual-pi"

NEON_PROGRAM = r"""
#include <arm_neon.h>
#include <stdio.h>
int main(int argc, char **argv) {
    (void)argv;
    int8x16_t a = vdupq_n_s8((int8_t)argc), b = vdupq_n_s8((int8_t)(argc + 1));
    int32x4_t sum = vdupq_n_s32(0);
#ifdef USE_I8MM
    sum = vmmlaq_s32(sum, a, b);   /* i8mm: Armv8.6, absent on the Cortex-A76 */
#else
    sum = vdotq_s32(sum, a, b);    /* dot product: Armv8.2, present on the Cortex-A76 */
#endif
    printf("%d\n", vgetq_lane_s32(sum, 0));
    return 0;
}
"""


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(VIRTUAL_PI), *args], capture_output=True, text=True, timeout=600,
        check=False, **kwargs,
    )


def leftovers(instance: Instance) -> list[str]:
    """What of `instance` is still present on the host."""
    found = []
    if network.exists(instance.name):
        found.append(f"network namespace {instance.name}")
    if subprocess.run(["ip", "link", "show", instance.name], capture_output=True).returncode == 0:
        found.append(f"host link {instance.name}")
    found += [f"loop device {device}" for device in disk.attached_devices(instance.nvme_image)]
    if os.path.ismount(instance.merged):
        found.append(f"mount {instance.merged}")
    if instance.is_running():
        found.append("systemd-nspawn")
    upper = f"upperdir={instance.dir / 'upper'},"
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if upper in mountinfo.read_text():
                found.append(f"process {mountinfo.parent.name}")
        except OSError:
            continue
    return found


def test_boots_arm64_trixie_under_systemd_reachable_over_ssh(virtual_pi):
    result = virtual_pi.ssh(
        "uname -m; . /etc/os-release; echo $VERSION_CODENAME; ps -o comm= -p 1; "
        "python3 -c 'import sys; print(sys.version_info[:2])'; "
        "systemctl is-system-running; systemctl --failed --plain --no-legend"
    )
    arch, codename, init, python, state, *rest = result.stdout.split("\n")
    assert (arch, codename, init, python) == ("aarch64", "trixie", "systemd", "(3, 13)")
    assert state == "running", f"failed units: {rest}"


def test_first_boot_is_cloud_init_and_sudo_asks_for_the_password(virtual_pi):
    """As on today's Raspberry Pi OS: cloud-init made the user pi from the seed Imager writes to
    the boot partition, and pi's sudo wants the password the testbed keeps for the inventory."""
    status = virtual_pi.ssh("cloud-init status --long", check=False).stdout
    assert "status: done" in status and "NoCloud" in status, status
    assert virtual_pi.ssh("ls /boot/firmware").stdout.split() == [
        "config.txt", "meta-data", "user-data"]
    refused = virtual_pi.ssh("sudo -n id -u", check=False)
    assert refused.returncode == 1 and "a password is required" in refused.stderr
    password = virtual_pi.sudo_password_file.read_text()
    allowed = virtual_pi.ssh(f"echo {shlex.quote(password)} | sudo -S -p '' id -u")
    assert allowed.stdout.strip() == "0"
    assert f"ansible_become_password: >-\n            {{{{ lookup('ansible.builtin.file', " \
        f"'{virtual_pi.sudo_password_file}') }}}}" in cli("inventory", "90").stdout


def test_looks_like_a_pi5_to_what_reads_the_board_facts(virtual_pi):
    model = virtual_pi.ssh("cat /sys/firmware/devicetree/base/model").stdout
    assert model == "Raspberry Pi 5 Model B Rev 1.0\0"
    revision = virtual_pi.ssh("od -An -tx1 /sys/firmware/devicetree/base/system/linux,revision")
    code = int(revision.stdout.replace(" ", "").strip(), 16)
    assert 256 << 20 << ((code >> 20) & 7) == 8 << 30, "revision code does not say 8 GB"
    cpuinfo = virtual_pi.ssh("cat /proc/cpuinfo").stdout
    features = [set(line.split(":")[1].split()) for line in cpuinfo.splitlines()
                if line.startswith("Features")]
    # qemu 10 answers /proc/cpuinfo itself, for the CPU it emulates (-cpu cortex-a76), with the
    # host's number of cores; the Pi's four are in the board files.
    assert features
    assert all({"asimd", "asimddp", "fphp"} <= core for core in features)
    assert not any(core & {"i8mm", "sve", "sme"} for core in features)
    assert cpuinfo.count("CPU part\t: 0xd0b") == len(features)  # every core a Cortex-A76
    config = virtual_pi.ssh("cat /boot/firmware/config.txt").stdout
    assert "arm_64bit=1" in config


def test_presents_a_blank_nvme_drive(virtual_pi):
    size = virtual_pi.ssh("blockdev --getsize64 /dev/nvme0n1", user="root").stdout
    assert int(size) == 64 << 30
    signature = virtual_pi.ssh("blkid -p /dev/nvme0n1", check=False, user="root")
    assert signature.returncode == 2, f"a blank drive has no signature: {signature.stdout}"


def test_three_instances_side_by_side_with_their_own_boards_and_drives(
    virtual_pi, fresh_virtual_pi
):
    big = fresh_virtual_pi(91, board="pi5-16gb", nvme="ext4")
    bare = fresh_virtual_pi(92, nvme="none")
    pis = [virtual_pi, big, bare]
    assert all(pi.is_running() for pi in pis)
    facts = "hostname; cat /etc/machine-id /sys/firmware/devicetree/base/serial-number"
    hostname, *identity = zip(*(pi.ssh(facts).stdout.split() for pi in pis), strict=True)
    assert hostname == ("vpi90", "vpi91", "vpi92")
    assert all(len(set(values)) == 3 for values in identity), "each Pi has its own identity"
    assert big.ssh("cat /sys/firmware/devicetree/base/model").stdout.startswith(
        "Raspberry Pi 5 Model B Rev 1.1"
    )
    assert 'TYPE="ext4"' in big.ssh("blkid /dev/nvme0n1", user="root").stdout
    assert bare.ssh("test -e /dev/nvme0n1", check=False).returncode == 1


def test_a_killed_run_leaves_nothing_that_breaks_the_next(virtual_pi_host):
    instance = Instance(93)
    booting = subprocess.Popen(
        [sys.executable, str(VIRTUAL_PI), "up", "-n", "93", "--fresh"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not instance.is_running():  # killed mid-boot, as a crashing test run would be
        assert booting.poll() is None and time.monotonic() < deadline, "never started booting"
        time.sleep(0.1)
    booting.kill()
    booting.wait()

    try:
        rerun = cli("up", "-n", "93")
        assert rerun.returncode == 0, rerun.stderr
        assert instance.ssh("true").returncode == 0

        # Worse: systemd-nspawn itself dies, orphaning the container's processes.
        os.kill(instance._nspawn_pid(), signal.SIGKILL)
        down = cli("down", "-n", "93")
        assert down.returncode == 0, down.stderr
        assert leftovers(instance) == []
    finally:
        instance.down()


def test_refuses_to_reuse_an_instance_that_differs_from_the_request(fresh_virtual_pi):
    instance = fresh_virtual_pi(95, nvme="ext4")
    other_board = cli("up", "-n", "95", "--nvme", "ext4", "--board", "pi5-16gb")
    assert other_board.returncode == 2 and "--fresh" in other_board.stderr
    instance.down()
    blank_instead = cli("up", "-n", "95")  # the drive holds data: never silently replaced
    assert blank_instead.returncode == 2 and "--fresh" in blank_instead.stderr
    other_release = cli("up", "-n", "95", "--nvme", "ext4", "--os", "bookworm")
    assert other_release.returncode == 2, other_release.stderr
    assert "was made as trixie, sudo password, not bookworm" in other_release.stderr
    assert leftovers(instance) == []
    assert 'TYPE="ext4"' in subprocess.run(
        ["blkid", str(instance.nvme_image)], capture_output=True, text=True, check=False
    ).stdout


def test_start_up_errors_say_what_is_missing(virtual_pi_host, tmp_path):
    not_root = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
         str(VIRTUAL_PI), "up", "-n", "94"],
        capture_output=True, text=True, check=False,
    )
    assert not_root.returncode == 2
    assert "needs root" in not_root.stderr and "sudo" in not_root.stderr

    no_tools = cli("up", "-n", "94", env={**os.environ, "PATH": str(tmp_path)})
    assert no_tools.returncode == 2
    assert "apt-get install" in no_tools.stderr and "debootstrap" in no_tools.stderr
    assert not Instance(94).dir.exists(), "a refused start must not create anything"


def test_restores_a_binfmt_registration_that_cannot_run_a_pi(virtual_pi_host):
    entry = BINFMT_DIR / "qemu-aarch64"
    entry.write_text("-1")
    try:
        assert not entry.exists()
        ensure_binfmt()
        status = entry.read_text()
        assert status.startswith("enabled")
        assert {"C", "F"} <= set(status.split("flags:")[1].split()[0])
    finally:
        ensure_binfmt()


@pytest.fixture(scope="module")
def neon_binaries(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("isa")
    source = directory / "neon.c"
    source.write_text(NEON_PROGRAM)
    builds = {
        "a76": ["-march=armv8.2-a+dotprod+fp16"],
        "i8mm": ["-march=armv8.6-a+i8mm", "-DUSE_I8MM"],
    }
    for name, flags in builds.items():
        subprocess.run(
            ["aarch64-linux-gnu-gcc", "-O2", *flags, "-o", directory / name, source], check=True
        )
    return {name: directory / name for name in builds}


def test_isa_check_catches_i8mm_and_passes_a_cortex_a76_build(virtual_pi_host, neon_binaries):
    a76 = cli("isa-check", str(neon_binaries["a76"]))
    assert a76.returncode == 0, a76.stderr
    assert a76.stdout.strip() == "8"  # 4 products of 1 x 2

    i8mm = cli("isa-check", str(neon_binaries["i8mm"]))
    assert i8mm.returncode == 1
    assert "illegal instruction" in i8mm.stderr and "would crash" in i8mm.stderr
    # Plain emulation (qemu's default CPU has every extension) would have let it through.
    assert subprocess.run(
        ["qemu-aarch64-static", "-L", str(isa.CROSS_SYSROOT), neon_binaries["i8mm"]],
        capture_output=True, check=False,
    ).returncode == 0


def test_the_virtual_pi_itself_refuses_what_a_cortex_a76_lacks(virtual_pi, neon_binaries):
    for name, binary in neon_binaries.items():
        subprocess.run(
            ["scp", "-q", "-i", str(virtual_pi.key), "-o",
             f"UserKnownHostsFile={virtual_pi.known_hosts}", str(binary),
             f"pi@{virtual_pi.address}:/tmp/{name}"],
            check=True,
        )
    assert virtual_pi.ssh("/tmp/a76").stdout.strip() == "8"
    crashed = virtual_pi.ssh("/tmp/i8mm; echo status=$?", check=False)
    assert f"status={128 + signal.SIGILL}" in crashed.stdout, crashed
    # Services too: systemd passes the Cortex-A76 setting on to what it starts.
    service = virtual_pi.ssh("systemd-run --wait /tmp/i8mm 2>&1", check=False, user="root")
    # systemd 257 says "code=killed, status=4/ILL" (252: "code=killed/status=ILL").
    assert re.search(r"code=killed(/|, )status=(4/)?ILL", service.stdout), service


def test_cross_built_llama_cpp_runs_as_a_cortex_a76_with_neon_and_dotprod(
    virtual_pi_host, model_path
):
    prefix = llamacpp.ensure_build()
    info = isa.llama_system_info(prefix)
    assert "NEON = 1" in info and "DOTPROD = 1" in info, info
    assert "OPENMP = 1" in info, info

    bench = isa.run_as_cortex_a76(
        prefix / "bin" / "llama-bench", "-m", str(model_path), "-p", "16", "-n", "8", "-r", "1",
        "-t", "2", "-o", "json",
    )
    assert bench.returncode == 0, bench.explain() + bench.stderr[-2000:]
    runs = {(run["n_prompt"], run["n_gen"]): run for run in json.loads(bench.stdout)}
    assert runs[(0, 8)]["avg_ts"] > 0 and runs[(16, 0)]["avg_ts"] > 0
    assert runs[(0, 8)]["model_type"].endswith("Q4_1")


def test_the_appliance_detects_a_pi5_8gb_with_nvme_in_the_virtual_pi(virtual_pi):
    # The detector and what it imports, nothing else: it runs on a bare Pi before provisioning.
    package = REPOSITORY / "appliance"
    virtual_pi.ssh("mkdir -p /tmp/detector/appliance/hardware")
    for folder, names in (("", ["__init__.py"]),
                          ("hardware", ["__init__.py", "sysfs.py", "detect.py"])):
        subprocess.run(
            ["scp", "-q", "-i", str(virtual_pi.key), "-o",
             f"UserKnownHostsFile={virtual_pi.known_hosts}",
             *(str(package / folder / name) for name in names),
             f"pi@{virtual_pi.address}:/tmp/detector/appliance/{folder}"],
            check=True,
        )
    script = ("import json; from appliance.hardware.detect import detect; "
              "print(json.dumps(detect()))")
    report = json.loads(virtual_pi.ssh(f"cd /tmp/detector && python3 -c '{script}'").stdout)
    assert report["board"] == {"model": "Raspberry Pi 5 Model B Rev 1.0", "revision": "d04170",
                               "memory_bytes": 8 << 30}
    assert report["cpu"]["model"] == "Cortex-A76" and "asimddp" in report["cpu"]["features"]
    assert report["storage"]["nvme_drives"] == ["nvme0n1"]

"""Would this arm64 binary run on a Raspberry Pi 5's Cortex-A76?

qemu's default CPU implements every arm64 extension, so a binary that uses i8mm, SVE or SME runs
happily under emulation and then dies with SIGILL on a real Pi. Running it as `-cpu cortex-a76`
makes qemu refuse those instructions exactly as the Pi's CPU does.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.control.host import HostError

from .rootfs import QEMU_CPU

CROSS_SYSROOT = Path("/usr/aarch64-linux-gnu")


@dataclass
class IsaResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def illegal_instruction(self) -> bool:
        return self.returncode == -signal.SIGILL

    def explain(self) -> str:
        if self.illegal_instruction:
            return (
                f"illegal instruction under -cpu {QEMU_CPU}: the binary uses an instruction the "
                "Pi 5's Cortex-A76 lacks (i8mm, SVE, SME?) and would crash there with SIGILL"
            )
        if self.returncode == 0:
            return f"ran under -cpu {QEMU_CPU}"
        return (
            f"failed under -cpu {QEMU_CPU} with exit status {self.returncode}: "
            f"{self.stderr[-500:]}"
        )


def run_as_cortex_a76(
    binary: Path, *args: str, library_path: list[Path] = (), timeout: float = 600
) -> IsaResult:
    """Run `binary` (built for arm64 against the cross toolchain's libc) as a Cortex-A76 would."""
    command = ["qemu-aarch64-static", "-cpu", QEMU_CPU, "-L", str(CROSS_SYSROOT)]
    if library_path:
        command += ["-E", "LD_LIBRARY_PATH=" + os.pathsep.join(map(str, library_path))]
    result = subprocess.run(
        [*command, str(binary), *args], capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    return IsaResult(result.returncode, result.stdout, result.stderr)


def llama_system_info(prefix: Path) -> str:
    """A llama.cpp build's system-info line, as a Cortex-A76 running it reports it."""
    result = run_as_cortex_a76(
        prefix / "bin" / "llama-system-info", library_path=[prefix / "lib"], timeout=120
    )
    if result.returncode != 0:
        raise HostError(f"llama-system-info failed: {result.explain()}\n{result.output}")
    return result.stdout.strip()

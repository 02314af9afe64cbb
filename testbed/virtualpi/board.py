"""The board facts a Raspberry Pi 5 exposes, rendered as files to mount into the virtual Pi.

A real Pi 5 names itself in the device tree (`/sys/firmware/devicetree/base/model`, with
`/proc/device-tree` a link to it), encodes its RAM size in the revision code
(`system/linux,revision`, bits 20-22), and lists the Cortex-A76 features in /proc/cpuinfo. The
virtual Pi shows the same files, so whatever reads them cannot tell the difference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Board:
    key: str
    model: str
    revision: int  # the revision code the firmware puts in the device tree and /proc/cpuinfo


# Revision codes: bit 23 new-style, bits 20-22 memory (5 = 8 GB, 6 = 16 GB), bits 12-15 the
# manufacturer, bits 4-11 the board type (0x17 = Pi 5), bits 0-3 the board revision.
BOARDS = {
    board.key: board
    for board in (
        Board("pi5-8gb", "Raspberry Pi 5 Model B Rev 1.0", 0xD04170),
        Board("pi5-16gb", "Raspberry Pi 5 Model B Rev 1.1", 0xE04171),
    )
}
DEFAULT_BOARD = "pi5-8gb"

# What a Pi 5 prints per core; "asimddp" is the dot product llama.cpp's Q4/Q8 kernels use, and
# i8mm, SVE and SME are absent, as on the real Cortex-A76.
CPU_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
    "dcpop asimddp"
)
CORES = 4


def serial_number(instance: str) -> str:
    """A stable, per-instance serial, like the one burned into each SoC."""
    return hashlib.sha256(instance.encode()).hexdigest()[:16]


def cpuinfo(board: Board, serial: str) -> str:
    core = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n"
        "CPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    )
    cores = "".join(core.format(n=n, features=CPU_FEATURES) for n in range(CORES))
    return (
        f"{cores}Revision\t: {board.revision:06x}\nSerial\t\t: {serial}\n"
        f"Model\t\t: {board.model}\n"
    )


def write_devicetree(root: Path, board: Board, serial: str) -> None:
    """Write the device-tree properties of `board` under `root` (mounted as .../devicetree/base)."""
    (root / "system").mkdir(parents=True, exist_ok=True)
    (root / "model").write_bytes(board.model.encode() + b"\0")
    (root / "compatible").write_bytes(b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    (root / "serial-number").write_bytes(serial.encode() + b"\0")
    (root / "system" / "linux,revision").write_bytes(board.revision.to_bytes(4, "big"))
    (root / "system" / "linux,serial").write_bytes(int(serial, 16).to_bytes(8, "big"))

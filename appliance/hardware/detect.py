"""What this machine offers a model: memory, CPU features, storage, swap, board and its state.

The planner budgets with it, /health and Ansible report it, `pi-appliance hw` prints it. Every file
is read under a root, so tests present a Pi 5 8GB, a Pi 5 16GB or a Pi 4 from fixture trees. What
cannot be read is None, never guessed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from appliance.hardware import sysfs

# Raspberry Pi revision codes (new style, bit 23 set): bits 20-22 give the RAM, 256 MB << n.
REVISION_FILE = "sys/firmware/devicetree/base/system/linux,revision"
NEW_STYLE_REVISION = 1 << 23
# cgroup limits: a container (or a systemd MemoryMax=) may allow less than the board has.
CGROUP_MEMORY_LIMITS = ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory/memory.limit_in_bytes")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
# ARM "CPU part" numbers of the cores Raspberry Pis use.
ARM_PARTS = {"0xd0b": "Cortex-A76", "0xd08": "Cortex-A72", "0xd03": "Cortex-A53"}
# The CPU features that decide which llama.cpp kernels can run.
KERNEL_FEATURES = ("asimd", "asimddp", "asimdhp", "fphp", "i8mm", "sve", "sme", "avx2", "avx512f",
                   "avx512_vnni", "f16c", "fma")


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative).read_text(errors="replace")
    except OSError:
        return None


def _meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    for line in (_read(root, "proc/meminfo") or "").splitlines():
        match = re.match(r"^(\w+):\s+(\d+) kB$", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values


def board_revision(root: Path) -> int | None:
    """The Raspberry Pi revision code, from the device tree or /proc/cpuinfo."""
    try:
        raw = (root / REVISION_FILE).read_bytes()
        if len(raw) == 4:
            return int.from_bytes(raw, "big")
    except OSError:
        pass
    match = re.search(r"^Revision\s*:\s*([0-9a-fA-F]+)\s*$", _read(root, "proc/cpuinfo") or "",
                      re.MULTILINE)
    return int(match.group(1), 16) if match else None


def board_memory_bytes(revision: int | None) -> int | None:
    """The RAM the board was built with, as its revision code says."""
    if revision is None or not revision & NEW_STYLE_REVISION:
        return None
    return (256 << 20) << ((revision >> 20) & 0x7)


def memory(root: Path) -> dict[str, Any]:
    info = _meminfo(root)
    limit = None
    for relative in CGROUP_MEMORY_LIMITS:
        text = (_read(root, relative) or "").strip()
        if text.isdigit() and int(text) < UNLIMITED:
            limit = int(text)
            break
    total = info.get("MemTotal")
    usable = min(value for value in (total, limit) if value is not None) if total else limit
    return {"total_bytes": total, "available_bytes": info.get("MemAvailable"),
            "cgroup_limit_bytes": limit, "usable_bytes": usable,
            "swap_total_bytes": info.get("SwapTotal"), "swap_free_bytes": info.get("SwapFree")}


def cpu(root: Path) -> dict[str, Any]:
    text = _read(root, "proc/cpuinfo") or ""
    features: set[str] = set()
    for match in re.finditer(r"^(?:Features|flags)\s*:\s*(.*)$", text, re.MULTILINE):
        features.update(match.group(1).split())
    parts = set(re.findall(r"^CPU part\s*:\s*(\S+)$", text, re.MULTILINE))
    names = sorted(ARM_PARTS.get(part, part) for part in parts)
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    logical = len(re.findall(r"^processor\s*:", text, re.MULTILINE)) or os.cpu_count()
    # Without a CPU topology under the root (a fixture board), every listed core counts.
    has_topology = (root / "sys/devices/system/cpu").is_dir()
    return {
        "model": ", ".join(names) if names else (model.group(1).strip() if model else None),
        "logical_cores": logical,
        "physical_cores": sysfs.physical_core_count(root) if has_topology else logical,
        "features": sorted(features & set(KERNEL_FEATURES)),
    }


def _mount_of(root: Path, path: Path) -> dict[str, str] | None:
    """The mount (source, mount point, type) that holds `path`, from the root's mount table."""
    best: dict[str, str] | None = None
    for line in (_read(root, "proc/mounts") or "").splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        source, mount_point, fstype = fields[:3]
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best["mount_point"])):
            best = {"source": source, "mount_point": mount_point, "fstype": fstype}
    return best


def _medium(source: str) -> str:
    name = Path(source).name
    if name.startswith("nvme"):
        return "nvme"
    if name.startswith("mmcblk"):
        return "sd"
    if name.startswith("sd"):
        return "usb"
    return "other"


def storage(root: Path, directories: dict[str, Path]) -> dict[str, Any]:
    """NVMe drives present, and for each directory: its filesystem, medium and free space."""
    # /sys/block lists the kernel's disks; a container may only have the device node.
    drives = sorted({entry.name for pattern in ("sys/block/nvme*", "dev/nvme*")
                     for entry in root.glob(pattern) if re.fullmatch(r"nvme\d+n\d+", entry.name)})
    places: dict[str, Any] = {}
    for role, directory in directories.items():
        mount = _mount_of(root, directory)
        place: dict[str, Any] = {"path": str(directory), **(mount or {})}
        if mount:
            place["medium"] = _medium(mount["source"])
        existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
        if existing is not None:
            stats = os.statvfs(existing)
            place["free_bytes"] = stats.f_bavail * stats.f_frsize
            place["size_bytes"] = stats.f_blocks * stats.f_frsize
        places[role] = place
    return {"nvme_drives": drives, "directories": places}


def detect(root: Path = Path("/"), directories: dict[str, Path] | None = None) -> dict[str, Any]:
    revision = board_revision(root)
    throttle = sysfs.throttle_state(root)
    return {
        "board": {"model": sysfs.board_model(root),
                  "revision": f"{revision:06x}" if revision is not None else None,
                  "memory_bytes": board_memory_bytes(revision)},
        "memory": memory(root),
        "cpu": cpu(root),
        "storage": storage(root, directories or {}),
        "soc_temperature_celsius": sysfs.soc_temperature_celsius(root),
        "throttle": throttle.as_dict() if throttle else None,
    }


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / (1 << 30):.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    board, mem, processor = report["board"], report["memory"], report["cpu"]
    lines = [
        f"board    {board['model'] or 'unknown'}"
        + (f" (revision {board['revision']}, {_gib(board['memory_bytes'])})"
           if board["revision"] else ""),
        f"cpu      {processor['model']}: {processor['physical_cores']} cores, "
        f"features {' '.join(processor['features']) or 'none of interest'}",
        f"memory   {_gib(mem['usable_bytes'])} usable of {_gib(mem['total_bytes'])}, "
        f"{_gib(mem['available_bytes'])} available, swap {_gib(mem['swap_total_bytes'])}",
        f"nvme     {', '.join(report['storage']['nvme_drives']) or 'none'}",
    ]
    for role, place in report["storage"]["directories"].items():
        lines.append(f"{role:<8} {place['path']} on {place.get('source', '?')} "
                     f"({place.get('fstype', '?')}, {place.get('medium', '?')}), "
                     f"{_gib(place.get('free_bytes'))} free")
    if report["soc_temperature_celsius"] is not None:
        lines.append(f"soc      {report['soc_temperature_celsius']:.1f} °C")
    if report["throttle"]:
        now = [name for name, on in report["throttle"]["now"].items() if on]
        lines.append(f"throttle {report['throttle']['raw']} ({', '.join(now) or 'none now'})")
    return "\n".join(lines)

"""Checks on a GGUF model file before llama.cpp parses it (its parser has had memory-safety bugs):
the fixed header's sanity, and that every tensor the header lists lies inside the file.

The fixed header (magic, version, counts) says nothing about truncation: a download cut short keeps
a perfect header. This reads the metadata and the tensor table, works out where the tensor data
ends, and compares that with the file's size, without loading anything.
"""

from __future__ import annotations

import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.exitcodes import ExitCode, ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_VERSIONS = (2, 3)
# Far above any real model (a 70B model has ~700 tensors and ~50 metadata keys).
MAX_TENSORS = 1_000_000
MAX_METADATA_KEYS = 100_000

# ggml type id → (elements per block, bytes per block), as in ggml's type traits.
TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17),
}
# GGUF metadata value types → struct format of a scalar (8: string, 9: array).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 24
MAX_DIMS = 8


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    metadata_count: int


def read_gguf_header(path: Path) -> GgufHeader:
    """Validate the fixed GGUF header; raise ModelFileError saying what is wrong."""
    try:
        # Only a regular file: opening a FIFO (or reading a device) can block for ever.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ModelFileError(f"{path}: not a regular file (a directory, pipe or device); "
                                 "point model.path at a .gguf file", ExitCode.MODEL_MISSING)
        with path.open("rb") as handle:
            head = handle.read(24)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found", ExitCode.MODEL_MISSING) from None
    except OSError as exc:  # a symlink loop, permissions, an I/O error of the drive
        raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror}; check the "
                             "path, its permissions and the drive (dmesg)",
                             ExitCode.MODEL_MISSING) from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"{path}: not a GGUF model file (no GGUF header); "
            "download the model again or point model.path at a .gguf file")
    version, tensors, keys = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_GGUF_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported "
                             f"(supported: {', '.join(map(str, SUPPORTED_GGUF_VERSIONS))})")
    if tensors == 0 or tensors > MAX_TENSORS or keys > MAX_METADATA_KEYS:
        raise ModelFileError(f"{path}: implausible GGUF header ({tensors} tensors, "
                             f"{keys} metadata keys); the file is corrupt")
    return GgufHeader(version, tensors, keys)


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path):
        self.handle = handle
        self.path = path

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ModelFileError(f"{self.path}: the GGUF file ends inside its header; "
                                 "it is truncated — download it again")
        return struct.unpack("<" + fmt, data)

    def string(self) -> bytes:
        (length,) = self.unpack("Q")
        if length > MAX_STRING:
            raise ModelFileError(f"{self.path}: implausible GGUF string length {length}")
        data = self.handle.read(length)
        if len(data) != length:
            raise ModelFileError(f"{self.path}: the GGUF file ends inside its header; "
                                 "it is truncated — download it again")
        return data

    def value(self, kind: int) -> object:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.unpack("IQ")
            if item_kind in SCALARS:  # skip the block without decoding it
                self.handle.seek(struct.calcsize("<" + SCALARS[item_kind]) * count, 1)
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        if kind not in SCALARS:
            raise ModelFileError(f"{self.path}: unknown GGUF metadata type {kind}; corrupt file")
        return self.unpack(SCALARS[kind])[0]


@dataclass(frozen=True)
class TensorInfo:
    name: bytes
    shape: tuple[int, ...]
    kind: int  # ggml type
    offset: int  # of its data, from the start of the data section
    kind_at: int  # where in the file `kind` is written


def tensor_infos(path: Path) -> tuple[list[TensorInfo], int]:
    """The tensor table, and where the data section starts."""
    header = read_gguf_header(path)
    with path.open("rb") as handle:
        reader = _Reader(handle, path)
        handle.seek(24)
        alignment = DEFAULT_ALIGNMENT
        for _ in range(header.metadata_count):
            key = reader.string()
            (kind,) = reader.unpack("I")
            value = reader.value(kind)
            if key == b"general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        infos = []
        for _ in range(header.tensor_count):
            name = reader.string()
            (dims,) = reader.unpack("I")
            if dims > MAX_DIMS:
                raise ModelFileError(f"{path}: implausible tensor with {dims} dimensions")
            shape = reader.unpack("Q" * dims)
            kind_at = handle.tell()
            kind, offset = reader.unpack("IQ")
            infos.append(TensorInfo(name, shape, kind, offset, kind_at))
        data_start = -(-handle.tell() // alignment) * alignment
    return infos, data_start


def required_size(path: Path) -> int:
    """The bytes a complete file must have: the end of its last tensor's data."""
    infos, data_start = tensor_infos(path)
    end_of_data = 0
    for info in infos:
        elements = math.prod(info.shape)
        block_elements, block_bytes = TYPE_SIZES.get(info.kind, (1, 0))  # unknown: offset only
        end_of_data = max(end_of_data, info.offset + elements // block_elements * block_bytes)
    return data_start + end_of_data


def check_complete(path: Path) -> None:
    """Raise ModelFileError unless the file holds all the tensor data its header describes."""
    needed, actual = required_size(path), path.stat().st_size
    if actual < needed:
        raise ModelFileError(f"{path}: truncated GGUF: {actual} bytes, its tensors need "
                             f"{needed}; download it again")


def quantization_name(file_type: int | None) -> str | None:
    """llama.cpp's `general.file_type` number as the name users know (Q4_K_M, ...)."""
    if file_type is None:
        return None
    from llama_cpp import llama_cpp  # import here: the table lives in the compiled bindings

    prefix = "LLAMA_FTYPE_MOSTLY_"
    for name in dir(llama_cpp):
        if name.startswith(prefix) and getattr(llama_cpp, name) == file_type:
            return name.removeprefix(prefix)
    if file_type == getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32", 0):
        return "F32"
    return f"type {file_type}"

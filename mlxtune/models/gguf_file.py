"""The GGUF container: key/value metadata and the tensor table, read without the tensor data.

`gguf.GGUFReader` (llama.cpp's reader) builds a numpy view per array element, which takes ~5 s
on SmolLM2's 49k-token vocabulary alone. Reading the header is on the path of every model listing
and size estimate, so this walks the layout with `struct` over a memory map instead (tens of
milliseconds) and skips long arrays unless the caller asks for them. Type ids, block sizes and
the magic number still come from the `gguf` package, so the layout has a single source of truth.

Layout (GGUF v2/v3, little-endian): magic, version, tensor count, kv count; the key/values; one
entry per tensor (name, dims fastest-first, ggml type, offset into the data section); padding to
`general.alignment`; the data section.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

# Arrays longer than this (token lists, merges, scores) are only kept when asked for.
LONG_ARRAY = 1024

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


_LENGTH = struct.Struct("<Q")


class GgufFormatError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table."""

    name: str
    shape: tuple[int, ...]  # logical, outermost first (numpy/MLX order)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset of the tensor's bytes in the file

    @property
    def nbytes(self) -> int:
        block_size, block_bytes = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block_size * block_bytes


@dataclass(frozen=True)
class GgufFile:
    metadata: dict
    tensors: list[TensorEntry]
    data_offset: int  # where the tensor data starts: everything before it is the header


class _Cursor:
    """Sequential little-endian reads over a buffer."""

    def __init__(self, buffer) -> None:
        self.buffer = buffer
        self.pos = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + length
        # Some vocabularies hold byte tokens that are not valid UTF-8 on their own.
        return bytes(self.buffer[start : self.pos]).decode("utf-8", errors="replace")

    def strings(self, count: int, keep: bool) -> list[str] | None:
        # Vocabularies hold ~100k strings: a tight loop, without per-item method calls.
        length_at, buffer, pos = _LENGTH.unpack_from, self.buffer, self.pos
        values = [] if keep else None
        for _ in range(count):
            (length,) = length_at(buffer, pos)
            pos += 8 + length
            if keep:
                values.append(bytes(buffer[pos - length : pos]).decode("utf-8", errors="replace"))
        self.pos = pos
        return values

    def value(self, value_type: int, keep_long_arrays: bool):
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array(keep_long_arrays)
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise GgufFormatError(f"unknown GGUF value type {value_type}")
        return self.unpack(fmt)

    def array(self, keep_long_arrays: bool):
        item_type, count = self.unpack("<IQ")
        keep = keep_long_arrays or count <= LONG_ARRAY
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            # Numeric arrays are one contiguous run: take them in a single numpy read.
            dtype = np.dtype(fmt)
            values = None
            if keep:
                values = np.frombuffer(self.buffer, dtype, count, self.pos).tolist()
            self.pos += dtype.itemsize * count
            return values
        if item_type == GGUFValueType.STRING:
            return self.strings(count, keep)
        return [self.value(item_type, keep_long_arrays) for _ in range(count)]


def read_gguf_file(path: str | Path, keep_long_arrays: bool = False) -> GgufFile:
    """Metadata and tensor table of a GGUF file. Arrays over LONG_ARRAY items are left out
    unless keep_long_arrays; tensor data is never touched."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        metadata = _read_metadata(cursor, keep_long_arrays)
        tensor_count = metadata.pop("GGUF.tensor_count")
        table = [_read_tensor_entry(cursor) for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        data_start = -(-cursor.pos // alignment) * alignment
        tensors = [
            TensorEntry(name, shape, ggml_type, data_start + offset)
            for name, shape, ggml_type, offset in table
        ]
        _check_size(tensors, len(buf), path)
    return GgufFile(metadata, tensors, data_start)


def _read_metadata(cursor: _Cursor, keep_long_arrays: bool) -> dict:
    magic, version = cursor.unpack("<II")
    if magic != GGUF_MAGIC:
        raise GgufFormatError("not a GGUF file (bad magic number)")
    if version & 0xFFFF == 0:
        raise GgufFormatError("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GgufFormatError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count, kv_count = cursor.unpack("<QQ")
    metadata: dict = {"GGUF.version": version, "GGUF.tensor_count": tensor_count}
    for _ in range(kv_count):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"), keep_long_arrays)
        if value is not None:
            metadata[key] = value
    return metadata


def _read_tensor_entry(cursor: _Cursor) -> tuple:
    name = cursor.string()
    n_dims = cursor.unpack("<I")
    dims = struct.unpack_from(f"<{n_dims}Q", cursor.buffer, cursor.pos)
    cursor.pos += 8 * n_dims
    raw_type, offset = cursor.unpack("<IQ")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GgufFormatError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    # ggml lists dimensions fastest-moving first; numpy and MLX the other way round.
    return name, tuple(reversed(dims)), ggml_type, offset


def _check_size(tensors: list[TensorEntry], file_size: int, path) -> None:
    # A truncated download otherwise surfaces later as an opaque read error.
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if end > file_size:
        raise GgufFormatError(f"{path} is truncated: its tensors end at byte {end} of {file_size}")

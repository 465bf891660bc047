"""Receiving and reading the files of an ImportAdapter stream.

The upload is spooled into the store's staging area with the shared
FileSpool (path checks, size limits, sha256), then read here: the config as
JSON, the weights with MLX's safetensors reader after a look at the header,
so a truncated or hostile file is refused with a message instead of an
allocation the header made up.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mlx.core as mx

from mlxtune.adapters.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
from mlxtune.errors import InvalidArgument
from mlxtune.serving.file_chunks import FileSpool

PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS)
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_MAX_IMPORT_BYTES = 4 << 30
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def import_spool(staging: Path, max_bytes: int = DEFAULT_MAX_IMPORT_BYTES) -> FileSpool:
    """A spool that takes exactly PEFT's two adapter files."""
    return FileSpool(staging, allowed=PEFT_FILES, max_total_bytes=max_bytes,
                     max_file_bytes={PEFT_CONFIG: MAX_CONFIG_BYTES}, field_path="chunk")


def read_peft_files(files: dict[str, Path]) -> tuple[dict, dict[str, mx.array]]:
    """(adapter_config.json as a dict, adapter_model.safetensors as MLX arrays)."""
    try:
        config = json.loads(files[PEFT_CONFIG].read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument.field(PEFT_CONFIG, f"is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument.field(PEFT_CONFIG, "must hold a JSON object")
    path = files[PEFT_WEIGHTS]
    _check_safetensors_header(path)
    try:
        tensors = mx.load(str(path), format="safetensors")
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise InvalidArgument.field(PEFT_WEIGHTS, f"cannot be read: {exc}") from None
    return config, tensors


def staged_digest(files: dict[str, Path]) -> str:
    """sha256 over the received files, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0".encode())
        with open(files[name], "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument.field(PEFT_WEIGHTS, f"is not a valid safetensors file: {why}")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 << 20):
            raise bad(f"the header claims {length} bytes")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise bad(f"the header is not JSON ({exc})") from None
    data_bytes = size - 8 - length
    for name, entry in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _FLOAT_DTYPES:
            raise InvalidArgument.field(f"{PEFT_WEIGHTS}[{name}]",
                                        f"dtype {dtype} is not F32, F16 or BF16")
        start, end = (entry.get("data_offsets") or [0, -1])[:2]
        if not 0 <= start <= end <= data_bytes:
            raise bad(f"{name}'s data lies outside the file (truncated upload?)")

"""Open a model as structure only: config, module tree and shapes, no weight bytes.

Preparing a checkpoint needs the model's module tree (to place adapters and
count parameters) but not its weights. MLX arrays are lazy, so mlx-lm's own
loader with ``lazy=True`` builds the model, applies its quantization and checks
every weight name and shape against the safetensors headers without reading a
single weight byte. GGUF files get the same from their tensor table.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn

from mlxtune.errors import FailedPrecondition, InvalidArgument
from mlxtune.models.resolve import ModelFormat, ModelSource

# Files besides the weights that define a model; all of them go into its digest.
_DEFINING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class ModelSpec:
    """A model's structure: its (lazy) MLX module tree and what the files say."""

    source: ModelSource
    config: dict
    model: nn.Module  # weights are lazy: nothing has been read yet
    weight_bytes: int
    digest: str
    dtype: str
    quantization: dict | None = None
    gguf_types: dict[str, int] = field(default_factory=dict)
    has_chat_template: bool = False

    @property
    def architecture(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)


def open_model_spec(source: ModelSource) -> ModelSpec:
    """The structure of the model at `source`, reading only headers."""
    if source.format is ModelFormat.GGUF:
        return _open_gguf_spec(source)
    return _open_folder_spec(source)


def _open_folder_spec(source: ModelSource) -> ModelSpec:
    from mlx_lm.utils import load_model

    path = source.path
    config = _read_config(path)
    from mlxtune.vlm.families import vlm_family

    if vlm_family(config) is not None:  # vision-language: mlx-vlm's loader
        from mlxtune.vlm.models import open_vlm_spec

        return open_vlm_spec(source, config)
    _check_supported(config)
    try:
        model, config = load_model(path, lazy=True, strict=True)
    except ValueError as exc:
        raise FailedPrecondition(
            message=f"model {source.name!r} does not match its architecture "
            f"{config.get('model_type')!r}: {exc}",
            reason="MODEL_FILES_INCONSISTENT",
        ) from exc
    headers = [_safetensors_header(f) for f in sorted(path.glob("*.safetensors"))]
    dtypes = {dt for h in headers for name, t in h.items() if name != "__metadata__"
              for dt in [t["dtype"]] if dt not in ("U32", "U8", "I32")}
    return ModelSpec(
        source=source,
        config=config,
        model=model,
        weight_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
        digest=folder_digest(path),
        dtype=_dtype_name(dtypes),
        quantization=config.get("quantization"),
        has_chat_template=_folder_has_chat_template(path),
    )


def _open_gguf_spec(source: ModelSource) -> ModelSpec:
    from mlxtune.models import gguf
    from mlxtune.models.gguf_skeleton import build_gguf_skeleton, gguf_module_quantization

    try:
        header = gguf.read_gguf_header(source.path)
        model = build_gguf_skeleton(header)
    except gguf.UnsupportedGguf as exc:
        raise FailedPrecondition(message=str(exc), reason="UNSUPPORTED_ARCHITECTURE") from exc
    types: dict[str, int] = {}
    for t in header.tensor_types.values():
        types[t] = types.get(t, 0) + 1
    quantized = {t for t in types if t.startswith(("Q", "IQ"))}
    return ModelSpec(
        source=source,
        config=header.config,
        model=model,
        weight_bytes=header.weight_bytes,
        digest=gguf_digest(source.path),
        dtype="float32" if "F32" in types and not quantized else "float16",
        quantization=_summarise(gguf_module_quantization(header)),
        gguf_types=types,
        has_chat_template="tokenizer.chat_template" in header.metadata,
    )


def _summarise(per_module: dict[str, dict]) -> dict | None:
    """One quantization dict for the model: the most common per-module setting."""
    if not per_module:
        return None
    settings = [json.dumps(q, sort_keys=True) for q in per_module.values()]
    return json.loads(max(set(settings), key=settings.count))


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument.field(
            "model", f"cannot read {path.name}/config.json: {exc}") from exc


def _check_supported(config: dict) -> None:
    from mlx_lm.utils import _get_classes

    if "model_type" not in config:
        raise FailedPrecondition(message="config.json has no model_type",
                                 reason="UNSUPPORTED_ARCHITECTURE")
    try:
        _get_classes(config)
    except ValueError as exc:
        raise FailedPrecondition(
            message=f"architecture {config['model_type']!r} is not supported by mlx-lm "
            f"{_mlx_lm_version()}: {exc}",
            reason="UNSUPPORTED_ARCHITECTURE",
            metadata={"architecture": str(config["model_type"])},
        ) from exc


def _mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _dtype_name(dtypes: set[str]) -> str:
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    known = sorted(names.get(d, d.lower()) for d in dtypes)
    return known[0] if len(known) == 1 else ",".join(known) or "unknown"


def _folder_has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def folder_digest(path: Path) -> str:
    """sha256 over the defining files and each weight file's name, size and header."""
    h = hashlib.sha256()
    for name in _DEFINING_FILES:
        f = path / name
        if f.is_file():
            h.update(f"{name}\0".encode())
            h.update(f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(length)
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        h.update(header)
    return "sha256:" + h.hexdigest()


def gguf_digest(path: Path) -> str:
    """sha256 over a GGUF file's size and everything before its tensor data."""
    from mlxtune.models.gguf_file import read_gguf_file

    offset = read_gguf_file(path).data_offset
    h = hashlib.sha256(f"{path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(offset))
    return "sha256:" + h.hexdigest()

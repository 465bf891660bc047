"""Resolve a model name to a folder or file the server may read.

A name is looked up, in order:
1. under the models directory: a Hugging Face folder, an MLX-quantized folder
   or a ``.gguf`` file (the ``.gguf`` suffix may be left out);
2. in the local Hugging Face cache, for hub ids ("org/name");
3. on the hub itself, when it is reachable and downloads are allowed.

No name can escape the models directory: ``..`` segments and absolute paths
outside it are refused. Links placed inside the directory by the operator are
followed (that is how an operator shares a model stored elsewhere).
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import InvalidArgument, NotFound

# Hub ids: "name" or "org/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class ModelFormat(str, enum.Enum):
    HF = "hf"
    MLX_QUANTIZED = "mlx_quantized"
    GGUF = "gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model name led: the resolved path and its format."""

    name: str
    path: Path
    format: ModelFormat


def resolve_model(name: str, models_dir: str | Path | None, *, allow_hub: bool = True) -> ModelSource:
    """Find the model called `name`; NotFound lists every place searched."""
    name = (name or "").strip()
    if not name:
        raise InvalidArgument.field("model", "a model name is required")
    searched: list[str] = []
    if models_dir is not None:
        found = _find_under(name, Path(models_dir), searched)
        if found is not None:
            return ModelSource(name=name, path=found, format=detect_format(found))
    if _HUB_ID.match(name):
        found = _find_in_hub(name, allow_hub, searched)
        if found is not None:
            return ModelSource(name=name, path=found, format=detect_format(found))
    else:
        searched.append(f"hub: not tried, {name!r} is not a hub id (org/name)")
    raise NotFound(
        message=f"model {name!r} not found; searched: " + "; ".join(searched),
        reason="MODEL_NOT_FOUND",
        metadata={"model": name},
    )


def detect_format(path: Path) -> ModelFormat:
    """The format of a model folder or file, or InvalidArgument saying what is missing."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelFormat.GGUF
        raise InvalidArgument.field("model", f"{path.name} is a file but not a .gguf model")
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: name that file)" if ggufs else ""
        raise InvalidArgument.field("model", f"{path.name} has no config.json{hint}")
    if not list(path.glob("*.safetensors")):
        raise InvalidArgument.field("model", f"{path.name} has no *.safetensors weights")
    import json

    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument.field(
            "model", f"{path.name}/config.json is not valid JSON: {exc}") from exc
    if "quantization" in cfg or "quantization" in cfg.get("text_config", {}):
        return ModelFormat.MLX_QUANTIZED
    return ModelFormat.HF


def _find_under(name: str, models_dir: Path, searched: list[str]) -> Path | None:
    root = models_dir.resolve()
    candidate = Path(name)
    if candidate.is_absolute():
        # An absolute name is accepted only if it lies inside the models directory.
        try:
            candidate = Path(os.path.normpath(candidate)).relative_to(root)
        except ValueError:
            raise InvalidArgument.field(
                "model", f"absolute paths must lie inside the models directory {root}"
            ) from None
    if any(part in ("..", "") for part in candidate.parts) or str(candidate).startswith("~"):
        raise InvalidArgument.field("model", "model names may not contain '..' or '~'")
    for relative in (candidate, candidate.with_name(candidate.name + ".gguf")):
        path = root / relative
        searched.append(f"models dir: {path}")
        if path.exists():
            return path
    return None


def _find_in_hub(name: str, allow_hub: bool, searched: list[str]) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        searched.append("hub: huggingface_hub is not installed")
        return None
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    patterns = DEFAULT_ALLOW_PATTERNS + ["*.safetensors", "*.gguf"]
    try:
        searched.append(f"Hugging Face cache: {name}")
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not cached"
        pass
    if not allow_hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        searched.append("hub: downloads are off (HF_HUB_OFFLINE=1 or --no-hub)")
        return None
    try:
        searched.append(f"hub: {name}")
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network errors, 404s, gated repos
        searched[-1] = f"hub: {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        return None

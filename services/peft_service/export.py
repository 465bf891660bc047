"""ExportCheckpoint's work: a checkpoint's files in the MLX, PEFT or fused layout.

Each exporter writes (or links) its files into a fresh folder under the
store's staging area and returns their names; the servicer streams them and
removes the folder. The PEFT and fused exports need the base model (its
structure, or its weights for fusing) and run under the core's MLX lock.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxtune.adapters.checkpoint import load_checkpoint_model, read_adapter_file
from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.fuse import fuse_adapters, fused_dtype, save_fused_model
from mlxtune.adapters.peft_format import (
    EMBEDDING,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    alpha_for_scale,
    layer_kind,
    mlx_to_peft_weights,
    peft_config_dict,
    peft_targets,
)
from mlxtune.adapters.targets import OUTPUT_HEADS, adaptable_modules
from mlxtune.errors import FailedPrecondition, InvalidArgument
from mlxtune.models.resolve import ModelFormat
from mlxtune.models.spec import ModelSpec
from mlxtune.store.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointRecord

FORMATS = ("mlx", "peft", "fused")


@dataclass
class ExportedFiles:
    """Files ready to stream: `names` relative to `folder`, which the caller removes."""

    folder: Path
    names: list[str]

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument.field("format", f"unknown export format {fmt!r}; use one of "
                                    + ", ".join(FORMATS))
    return fmt


def export_mlx(record: CheckpointRecord, dest: Path) -> list[str]:
    """The checkpoint's own files: mlx-lm's load_adapters reads them as they are."""
    names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    for name in names:
        # A hard link keeps the bytes readable even if the checkpoint is
        # deleted while the stream is running.
        try:
            os.link(record.path / name, dest / name)
        except OSError:
            shutil.copy2(record.path / name, dest / name)
    return names


def export_peft(record: CheckpointRecord, spec: ModelSpec, dest: Path) -> list[str]:
    """adapter_model.safetensors + adapter_config.json that PEFT's from_pretrained loads."""
    config = AdapterConfig.from_dict(record.manifest.adapter_config)
    if config.method == "full":
        raise FailedPrecondition(
            message=f"{record.manifest.name} is a full fine-tune: it has no adapter for PEFT; "
            "export it as EXPORT_FORMAT_FUSED (a full model) instead",
            reason="EXPORT_FORMAT_UNSUPPORTED")
    file_config = read_adapter_file(record)
    weights = mx.load(str(record.path / ADAPTER_WEIGHTS))
    all_modules = adaptable_modules(spec.model)
    by_path = {m.path: m for m in all_modules}
    kinds, chosen = {}, []
    for name in sorted(weights):
        path, leaf = name.rsplit(".", 1)
        info = by_path.get(path)
        if info is None or leaf not in ("lora_a", "lora_b", "m"):
            raise _unsupported(record, f"its tensor {name} has no place in the base model")
        if "Switch" in info.layer_type:
            raise _unsupported(record, f"{path} is a mixture-of-experts layer, which PEFT's "
                               "LoRA layout cannot express")
        if path not in kinds:
            kinds[path] = layer_kind(info)
            chosen.append(info)
    embeddings = [m for m in chosen if kinds[m.path] == EMBEDDING]
    if embeddings and config.method == "dora":
        raise _unsupported(record, "DoRA on an embedding keeps one magnitude per token in "
                           "mlx-lm but one per dimension in PEFT")
    if embeddings and not any(m.leaf in OUTPUT_HEADS for m in all_modules):
        raise _unsupported(record, f"{embeddings[0].path} is tied to the output head: mlx-lm "
                           "adapts the head with it, PEFT would not")
    if config.method == "dora" and any(f"{m.path}.m" not in weights for m in chosen):
        dtype = next(iter(weights.values())).dtype
        weights = {**{k: v.astype(dtype) for k, v in _dora_magnitudes(record).items()},
                   **weights}
    total = spec.num_layers
    targets, layers = peft_targets(chosen, all_modules, list(file_config.get("target_modules")
                                                             or []),
                                   total, config.num_layers or total)
    scale = float(file_config.get("lora_parameters", {}).get("scale", config.scale))
    peft_config = peft_config_dict(
        rank=config.rank, alpha=alpha_for_scale(scale, config.rank, config.use_rslora,
                                                config.effective_alpha),
        dropout=config.dropout, use_rslora=config.use_rslora,
        use_dora=config.method == "dora", target_modules=targets,
        layers_to_transform=layers, base_model=record.manifest.base_model.get("model", ""))
    mx.save_safetensors(str(dest / PEFT_WEIGHTS), mlx_to_peft_weights(weights, kinds),
                        metadata={"format": "pt"})
    (dest / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return [PEFT_CONFIG, PEFT_WEIGHTS]


def export_fused(record: CheckpointRecord, spec: ModelSpec, dest: Path) -> list[str]:
    """A full model folder: the dequantized base with the adapter merged in."""
    # Merge in float32 whatever the base's dtype, then store in the base's dtype.
    loaded = load_checkpoint_model(record, compute_dtype="float32", for_training=False)
    model = fuse_adapters(loaded.model)
    base = record.manifest.base_model
    folder_base = base.get("format") != ModelFormat.GGUF.value
    return save_fused_model(dest, model, loaded.config, loaded.tokenizer,
                            fused_dtype(spec.dtype, spec.quantization is not None),
                            tokenizer_source=Path(base["resolved_path"]) if folder_base else None)


def _dora_magnitudes(record: CheckpointRecord) -> dict:
    """DoRA magnitudes of a checkpoint that does not store them (a prepared one):
    mlx-lm derives them from the base weights when it loads the adapter."""
    loaded = load_checkpoint_model(record, compute_dtype="float32", for_training=False)
    return {name: value for name, value in tree_flatten(loaded.model.parameters())
            if name.endswith(".m")}


def _unsupported(record: CheckpointRecord, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        message=f"{record.manifest.name} cannot be exported in PEFT's layout: {why}",
        reason="EXPORT_FORMAT_UNSUPPORTED")

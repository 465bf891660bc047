"""Load a checkpoint from the store onto its base model, ready to train or run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from mlxtune.adapters.apply import unfreeze_for_full
from mlxtune.adapters.config import AdapterConfig
from mlxtune.errors import FailedPrecondition
from mlxtune.models.load import load_base_model
from mlxtune.models.resolve import ModelFormat
from mlxtune.models.spec import folder_digest, gguf_digest
from mlxtune.store.checkpoints import ADAPTER_CONFIG, CheckpointRecord


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    tokenizer: object
    config: dict  # the base model's config
    adapter_config: AdapterConfig


def verify_base_unchanged(record: CheckpointRecord) -> None:
    """The base model on disk must still be the one the checkpoint was made for."""
    base = record.manifest.base_model
    path = Path(base["resolved_path"])
    if not path.exists():
        raise FailedPrecondition(
            message=f"the base model of {record.manifest.name} ({path}) no longer exists",
            reason="BASE_MODEL_MISSING")
    digest = gguf_digest(path) if base["format"] == ModelFormat.GGUF.value else folder_digest(path)
    if digest != base["digest"]:
        raise FailedPrecondition(
            message=f"the base model at {path} changed since {record.manifest.name} was made "
            f"(digest {digest} != {base['digest']})", reason="BASE_MODEL_CHANGED")


def load_checkpoint_model(record: CheckpointRecord, compute_dtype: str | None = None,
                          *, for_training: bool = True) -> LoadedCheckpoint:
    """Base model + the checkpoint's adapter, names and shapes checked.

    For training, the base is frozen and only the adapter (or, for full
    fine-tuning, the selected blocks) is trainable.
    """

    verify_base_unchanged(record)
    base = record.manifest.base_model
    from mlxtune.vlm.checkpoint import base_family, load_vlm_checkpoint

    if base_family(base) is not None:  # vision-language: mlx-vlm's loader and processor
        return load_vlm_checkpoint(record, compute_dtype, for_training=for_training)
    model, tokenizer, config = load_base_model(base["resolved_path"], base["format"],
                                               compute_dtype)
    adapter_config = attach_adapter(model, record)
    if adapter_config.method == "full" and for_training:
        unfreeze_for_full(model, adapter_config)
    if not for_training:
        model.eval()
    return LoadedCheckpoint(model, tokenizer, config, adapter_config)


def attach_adapter(model: nn.Module, record: CheckpointRecord) -> AdapterConfig:
    """Freeze `model` and put the checkpoint's adapter on it; returns its config.

    mlx-lm re-creates its LoRA/DoRA layers from adapter_config.json and
    refuses tensors whose names or shapes don't match the model.
    """
    from mlx_lm.tuner.utils import load_adapters

    model.freeze()
    try:
        load_adapters(model, str(record.path))
    except ValueError as exc:
        raise FailedPrecondition(message=f"{record.manifest.name} does not fit its base "
                                 f"model: {exc}", reason="ADAPTER_MISMATCH") from exc
    return AdapterConfig.from_dict(record.manifest.adapter_config)


def read_adapter_file(record: CheckpointRecord) -> dict:
    return json.loads((record.path / ADAPTER_CONFIG).read_text())

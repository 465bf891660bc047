"""Load a VLM checkpoint from the store onto its base model, ready to train.

The adapter file is the text path's: mlx-lm's ``load_adapters`` re-creates
the LoRA/DoRA layers from its keys (block-relative keys for the language
model, full paths for vision and projector modules) and refuses tensors
whose names or shapes do not fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxtune.adapters.checkpoint import LoadedCheckpoint, attach_adapter
from mlxtune.store.checkpoints import CheckpointRecord
from mlxtune.vlm.families import Tower, VlmFamily, vlm_family


@dataclass
class VlmLoadedCheckpoint(LoadedCheckpoint):
    """A loaded checkpoint whose model is a VLM: the processor comes along."""

    processor: object = None
    family: VlmFamily | None = None


def base_family(base_model: dict) -> VlmFamily | None:
    """The VLM family of a checkpoint's base model folder, or None."""
    if base_model.get("format") == "gguf":
        return None
    try:
        config = json.loads((Path(base_model["resolved_path"]) / "config.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    return vlm_family(config)


def load_vlm_checkpoint(record: CheckpointRecord, compute_dtype: str | None = None,
                        *, for_training: bool = True) -> VlmLoadedCheckpoint:
    """Base VLM + the checkpoint's adapter; for training only the adapter
    (or, for full fine-tuning, the selected towers) is trainable."""
    from mlxtune.models.load import default_compute_dtype
    from mlxtune.vlm.models import load_vlm
    from mlxtune.vlm.towers import unfreeze_towers_for_full

    base = record.manifest.base_model
    model, processor, config = load_vlm(base["resolved_path"],
                                        compute_dtype or default_compute_dtype())
    family = vlm_family(config)
    adapter_config = attach_adapter(model, record)
    if adapter_config.method == "full" and for_training:
        towers = tuple(Tower(t) for t in adapter_config.towers)
        unfreeze_towers_for_full(model, family, towers,
                                 adapter_config.num_layers or len(model.layers))
    if not for_training:
        model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    return VlmLoadedCheckpoint(model, tokenizer, config, adapter_config,
                               processor=processor, family=family)

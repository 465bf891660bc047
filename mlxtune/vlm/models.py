"""Open, load and adapt VLM folders with mlx-vlm's own loaders.

``open_vlm_spec`` gives the PEFT service the model's structure without
reading weight bytes (mlx-vlm's loader with ``lazy=True`` builds the model,
sanitizes names and checks every tensor name and shape, strictly, against
the files). ``load_vlm`` gives a training worker the weights, cast to the
compute dtype, and the processor (image processor + tokenizer + template).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.targets import Selection
from mlxtune.errors import FailedPrecondition, Violations
from mlxtune.models.resolve import ModelSource
from mlxtune.models.spec import (
    ModelSpec,
    _dtype_name,
    _folder_has_chat_template,
    _safetensors_header,
    folder_digest,
)
from mlxtune.vlm.families import Tower, VlmFamily, require_mlx_vlm, vlm_family
from mlxtune.vlm.towers import select_vlm_modules, unfreeze_towers_for_full


@dataclass
class VlmModelSpec(ModelSpec):
    """A ModelSpec whose model is an mlx-vlm model of `family`."""

    family: VlmFamily | None = None


def _load_mlx_vlm_model(path: Path, lazy: bool) -> nn.Module:
    require_mlx_vlm()
    from mlx_vlm.utils import load_model

    try:
        return load_model(path, lazy=lazy, strict=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            message=f"{path.name} does not match its vision-language architecture: {exc}",
            reason="MODEL_FILES_INCONSISTENT") from exc


def open_vlm_spec(source: ModelSource, config: dict) -> VlmModelSpec:
    """The structure of the VLM folder at `source`, reading only headers."""
    family = vlm_family(config)
    assert family is not None, "open_vlm_spec needs a VLM config"
    path = source.path
    model = _load_mlx_vlm_model(path, lazy=True)
    files = sorted(path.glob("*.safetensors"))
    dtypes = {t["dtype"] for f in files for name, t in _safetensors_header(f).items()
              if name != "__metadata__" and t["dtype"] not in ("U32", "U8", "I32")}
    return VlmModelSpec(
        source=source, config=config, model=model,
        weight_bytes=sum(f.stat().st_size for f in files), digest=folder_digest(path),
        dtype=_dtype_name(dtypes), quantization=config.get("quantization"),
        has_chat_template=_folder_has_chat_template(path), family=family)


def load_vlm(path: str | Path, compute_dtype: str, dequantize: bool | None = None):
    """(model, processor, config) with weights in memory, floats in compute_dtype.

    Quantized weights are dequantized on a CPU by default, as for text models
    (see ``mlxtune.models.load``)."""
    from mlxtune.models.load import cast_floats

    require_mlx_vlm()
    from mlx_vlm.utils import load_config, load_processor

    path = Path(path)
    model = _load_mlx_vlm_model(path, lazy=True)
    config = load_config(path)
    if dequantize is None:
        dequantize = mx.default_device() != mx.gpu
    if dequantize and any(hasattr(m, "bits") for _, m in model.named_modules()):
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    cast_floats(model, compute_dtype)
    mx.eval(model.parameters())
    processor = load_processor(path, add_detokenizer=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    # Some checkpoints keep the template only in chat_template.json (the
    # processor's); the chat renderer asks the tokenizer.
    if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    return model, processor, config


def get_vlm_peft_model(model: nn.Module, family: VlmFamily, config: AdapterConfig,
                       towers: tuple[Tower, ...], violations: Violations | None = None
                       ) -> Selection:
    """Adapt `model` in place per `config` (effective) on `towers`; only the
    adapters (or, for full fine-tuning, the selected towers) train afterwards."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    selection = select_vlm_modules(model, family, config, towers, violations)
    model.freeze()
    num_layers = config.num_layers or len(model.layers)
    if config.method == "full":
        unfreeze_towers_for_full(model, family, towers, num_layers)
        return selection
    mx.random.seed(config.seed)  # reproducible initial A matrices
    linear_to_lora_layers(
        model, num_layers,
        {"rank": config.rank, "scale": config.scale, "dropout": config.dropout,
         "keys": selection.mlx_keys},
        use_dora=config.method == "dora")
    return selection

"""Merge an adapter into its base model and save the result as a plain model folder.

Merging goes through mlx-lm's own ``fuse(dequantize=True)`` of each adapter
layer. Dequantizing is not optional here: re-quantizing a merged weight to the
base's 4 bits rounds it onto the same grid the base weight sat on, and a LoRA
update is usually far smaller than one quantization step, so most of it
would vanish. The saved folder therefore holds float weights (dtype: see
:func:`fused_dtype`) and a config without "quantization"; mlx-lm's ``load``
and transformers both read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxtune.models.load import DTYPES, cast_floats

# Tokenizer and generation files a model folder carries besides its weights
# (the same patterns mlx-lm's tokenizer loader reads).
_TOKENIZER_PATTERNS = ("*.json", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                       "*.jinja")
_NOT_TOKENIZER = {"config.json", "model.safetensors.index.json", "adapter_config.json"}


def fuse_adapters(model: nn.Module) -> nn.Module:
    """Every adapter layer merged into its base layer, every quantized layer dequantized."""
    from mlx_lm.utils import dequantize_model

    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if any(hasattr(module, "bits") for _, module in model.named_modules()):
        model = dequantize_model(model)
    return model


def fused_dtype(base_dtype: str, quantized: bool) -> str:
    """The dtype of the merged weights.

    An unquantized base keeps its dtype (what PEFT's merge_and_unload does).
    A quantized base is dequantized into float32 when its floats (scales,
    norms) are float32, else into float16: bfloat16 has 3 mantissa bits
    fewer, and its rounding (about 0.2% of a weight) would eat much of a small
    update, the very thing dequantizing is for.
    """
    if base_dtype not in DTYPES:
        return "float16"
    if quantized and base_dtype == "bfloat16":
        return "float16"
    return base_dtype


def save_fused_model(dest: Path, model: nn.Module, config: dict, tokenizer,
                     dtype: str, tokenizer_source: Path | None = None) -> list[str]:
    """Write config.json, model*.safetensors and the tokenizer into `dest`; the file names.

    `tokenizer_source`: a model folder whose tokenizer files are copied as they
    are; without one (a GGUF base) the tokenizer is saved with save_pretrained.
    """
    from mlx_lm.utils import save_config, save_model

    dest.mkdir(parents=True, exist_ok=True)
    cast_floats(model, dtype)
    mx.eval(model.parameters())
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    save_model(dest, model, donate_model=True)
    save_config(config, dest / "config.json")
    if tokenizer_source is not None and tokenizer_source.is_dir():
        for pattern in _TOKENIZER_PATTERNS:
            for path in tokenizer_source.glob(pattern):
                if path.name not in _NOT_TOKENIZER and path.is_file():
                    shutil.copy2(path, dest / path.name)
    else:
        tokenizer.save_pretrained(str(dest))
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

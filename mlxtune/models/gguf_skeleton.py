"""The module tree of a GGUF model, built from its tensor table alone.

Counting parameters and placing adapters needs the model's structure, not its
weights: this builds mlx-lm's model class from the GGUF header's config,
quantizes the modules the file stores in a type MLX keeps packed, and checks
every parameter's logical shape against the file's tensor table.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.models.gguf import GgufHeader, UnsupportedGguf

# GGUF tensor types MLX reads natively as affine-quantized weights (bits, group size).
NATIVE_QUANT_TYPES = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}


def gguf_module_quantization(header: GgufHeader) -> dict[str, dict]:
    """Per module path, the MLX quantization its weight keeps when loaded."""
    out = {}
    for name, ggml_type in header.tensor_types.items():
        if name.endswith(".weight") and ggml_type in NATIVE_QUANT_TYPES:
            bits, group_size = NATIVE_QUANT_TYPES[ggml_type]
            out[name[: -len(".weight")]] = {"bits": bits, "group_size": group_size,
                                             "mode": "affine"}
    return out


def build_gguf_skeleton(header: GgufHeader) -> nn.Module:
    """mlx-lm's model for the header's config, lazily initialised, shape-checked."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(header.config)
    except ValueError as exc:
        raise UnsupportedGguf(str(exc)) from exc
    model = model_class(args_class.from_dict(header.config))
    per_module = gguf_module_quantization(header)
    nn.quantize(model, class_predicate=lambda path, module: per_module.get(path, False))
    _check_shapes(model, header)
    return model


def _check_shapes(model: nn.Module, header: GgufHeader) -> None:
    logical = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")):
            continue
        shape = tuple(value.shape)
        module_path = name.rsplit(".", 1)[0]
        bits = getattr(_module_at(model, module_path), "bits", None)
        if bits and name.endswith(".weight"):
            shape = shape[:-1] + (shape[-1] * 32 // bits,)
        logical[name] = shape
    missing = sorted(set(logical) - set(header.tensor_shapes))
    mismatched = sorted(n for n in logical if n in header.tensor_shapes
                        and tuple(header.tensor_shapes[n]) != logical[n])
    if missing or mismatched:
        details = [f"missing {n}" for n in missing[:5]]
        details += [f"{n}: file {tuple(header.tensor_shapes[n])} vs model {logical[n]}"
                    for n in mismatched[:5]]
        raise UnsupportedGguf(
            f"{header.path.name} does not match mlx-lm's {header.config.get('model_type')} "
            "model: " + "; ".join(details)
        )


def _module_at(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module

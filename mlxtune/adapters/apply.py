"""Turn a model into a PEFT-ready model: adapters in, base frozen, counts out.

The adapter layers are mlx-lm's own (``LoRALinear``, ``DoRALinear``,
``LoRAEmbedding``…), placed by ``linear_to_lora_layers``; this module decides
which modules they go on, freezes the rest and counts what trains, the way
Hugging Face PEFT counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.targets import Selection, select_modules
from mlxtune.errors import FailedPrecondition, Violations


@dataclass
class ModuleCount:
    module: str
    layer_type: str
    in_features: int
    out_features: int
    base_parameters: int
    trainable_parameters: int


@dataclass
class ParameterReport:
    """Trainable and total parameters, as PEFT's print_trainable_parameters has them."""

    trainable: int
    total: int
    modules: list[ModuleCount] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def summary(self) -> str:
        """Exactly the line PEFT prints."""
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {self.percent:.4f}")


def get_peft_model(model: nn.Module, config: AdapterConfig,
                   violations: Violations | None = None) -> Selection:
    """Adapt `model` in place per `config` (effective); returns what was selected.

    Afterwards only the adapter parameters (or, for full fine-tuning, the
    selected blocks) are trainable.
    """
    selection = select_modules(model, config, violations)
    model.freeze()
    if config.method == "full":
        unfreeze_for_full(model, config)
        return selection
    apply_lora_layers(model, config, selection)
    return selection


def apply_lora_layers(model: nn.Module, config: AdapterConfig, selection: Selection) -> None:
    """Put mlx-lm's LoRA (or DoRA) layers on the selected modules, in place."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    # The seed makes the initial A matrices reproducible: same inputs, same checkpoint.
    mx.random.seed(config.seed)
    linear_to_lora_layers(
        model,
        config.num_layers or len(model.layers),
        {"rank": config.rank, "scale": config.scale, "dropout": config.dropout,
         "keys": selection.mlx_keys},
        use_dora=config.method == "dora",
    )


def unfreeze_for_full(model: nn.Module, config: AdapterConfig) -> None:
    quantized = [p for p, m in model.named_modules() if hasattr(m, "bits")]
    if quantized:
        raise FailedPrecondition(
            message=f"full fine-tuning needs unquantized weights, but {quantized[0]} and "
            f"{len(quantized) - 1} more modules are quantized; use LoRA or DoRA, or a "
            "float model",
            reason="QUANTIZED_FULL_FINE_TUNE",
        )
    total = len(model.layers)
    if (config.num_layers or total) >= total:
        model.unfreeze()  # every parameter, embeddings and head included
    else:
        for block in model.layers[total - config.num_layers:]:
            block.unfreeze()


def local_parameter_count(module: nn.Module) -> int:
    """Parameters owned by the module itself, quantized weights at logical size.

    Quantization scales and biases are storage detail, not parameters: a
    quantized model has the parameter count of the model it was made from.
    "_"-prefixed arrays are buffers (e.g. rotary tables), which MLX leaves
    out of ``parameters()`` and PEFT does not count either.
    """
    bits = getattr(module, "bits", None)
    count = 0
    for name, value in module.items():
        if name.startswith("_") or not isinstance(value, mx.array):
            continue
        if bits and name in ("scales", "biases"):
            continue
        count += value.size * 32 // bits if bits and name == "weight" else value.size
    return count


def count_parameters(model: nn.Module, selection: Selection | None = None) -> ParameterReport:
    """Trainable and total parameters; a per-module breakdown of the selection."""
    total = sum(local_parameter_count(m) for _, m in model.named_modules())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    modules = []
    if selection is not None:
        named = dict(model.named_modules())
        for info in selection.modules:
            adapted = named[info.path]
            base = getattr(adapted, "linear", None) or getattr(adapted, "embedding", None) or adapted
            own = sum(v.size for _, v in tree_flatten(adapted.trainable_parameters()))
            modules.append(ModuleCount(info.path, info.layer_type, info.in_features,
                                       info.out_features, local_parameter_count(base), own))
    return ParameterReport(trainable=trainable, total=total, modules=modules)


def print_trainable_parameters(model: nn.Module) -> str:
    """Print, and return, the line PEFT's print_trainable_parameters() prints."""
    line = count_parameters(model).summary
    print(line)
    return line


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable parameters by name: what an adapter checkpoint stores."""
    return dict(tree_flatten(model.trainable_parameters()))

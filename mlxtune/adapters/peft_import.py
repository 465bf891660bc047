"""Check a Hugging Face PEFT adapter against a model and turn it into mlx-lm's form.

The adapter's tensors say which modules it adapts; the model (its structure
only, weights may stay lazy) says which modules exist and what shapes their
adapters have: mlx-lm's own LoRA/DoRA layers are placed on it from the
derived configuration, and every tensor must fit the parameter it lands in.
Problems are collected and raised together as one ``InvalidArgument`` whose
field violations name the file and tensor, and say what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.adapters.apply import get_peft_model
from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.peft_format import (
    EMBEDDING,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PeftAdapterConfig,
    layer_kind,
    parse_peft_config,
    peft_key,
    peft_shape,
    peft_to_mlx_weights,
)
from mlxtune.adapters.targets import (
    OUTPUT_HEADS,
    ModuleInfo,
    Selection,
    adaptable_modules,
    available_names,
    select_modules,
)
from mlxtune.errors import InvalidArgument, Violations

REASON = "INVALID_ADAPTER"
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass
class ImportedAdapter:
    config: AdapterConfig  # effective: every default filled in
    selection: Selection
    weights: dict[str, mx.array]  # mlx-lm names and orientation
    peft: PeftAdapterConfig


def adapter_from_peft(model: nn.Module, model_name: str, config_data: dict,
                      tensors: dict[str, mx.array]) -> ImportedAdapter:
    """Validate a PEFT adapter for `model` and adapt the model with it (in place)."""
    v = Violations()
    peft = parse_peft_config(config_data, v)
    weights, kinds, origin, unknown = peft_to_mlx_weights(tensors)
    for key in unknown[:8]:
        v.add(f"{PEFT_WEIGHTS}[{key}]", "not a LoRA tensor: expected base_model.model.<module>"
              " followed by .lora_A.weight, .lora_B.weight, .lora_magnitude_vector, "
              ".lora_embedding_A or .lora_embedding_B")
    if len(unknown) > 8:
        v.add(PEFT_WEIGHTS, f"{len(unknown) - 8} more tensors are not LoRA tensors")
    if not weights and not unknown:
        v.add(PEFT_WEIGHTS, "holds no tensors")
    all_modules = adaptable_modules(model)
    chosen = _known_modules(all_modules, kinds, origin, model_name, v)
    if peft is not None:
        _check_supported_layers(chosen, all_modules, peft, v)
    v.raise_if_any(reason=REASON)

    total = len(model.layers)
    config = _adapter_config(peft, chosen, all_modules, total, model, v).with_defaults(total)
    v.raise_if_any(reason=REASON)
    selection = get_peft_model(model, config)
    _check_tensors(model, selection, config, peft, weights, origin, v)
    v.raise_if_any(reason=REASON)
    return ImportedAdapter(config, selection, dict(sorted(weights.items())), peft)


def _known_modules(all_modules: list[ModuleInfo], kinds: dict[str, str],
                   origin: dict[str, str], model_name: str, v: Violations) -> list[ModuleInfo]:
    by_path = {m.path: m for m in all_modules}
    first_key = {}
    for name, key in origin.items():
        first_key.setdefault(name.rsplit(".", 1)[0], key)
    chosen = []
    for path, kind in kinds.items():
        info = by_path.get(path)
        where = f"{PEFT_WEIGHTS}[{first_key[path]}]"
        if info is None:
            v.add(where, f"model {model_name!r} has no adaptable module {path!r} "
                  f"(its modules look like {all_modules[0].path if all_modules else '?'}; "
                  f"names: {', '.join(available_names(all_modules))})")
        elif layer_kind(info) != kind:
            v.add(where, f"{path} is a {info.layer_type}, but the tensor is for an "
                  f"{kind} layer")
        else:
            chosen.append(info)
    order = {m.path: i for i, m in enumerate(all_modules)}
    return sorted(chosen, key=lambda m: order[m.path])


def _check_supported_layers(chosen: list[ModuleInfo], all_modules: list[ModuleInfo],
                            peft: PeftAdapterConfig, v: Violations) -> None:
    embeddings = [m for m in chosen if layer_kind(m) == EMBEDDING]
    if embeddings and peft.use_dora:
        v.add(f"{PEFT_CONFIG}.use_dora", "DoRA on embedding layers is not supported: PEFT "
              "keeps one magnitude per embedding dimension, mlx-lm one per token")
    tied = not any(m.leaf in OUTPUT_HEADS for m in all_modules)
    if embeddings and tied:
        v.add(f"{PEFT_CONFIG}.target_modules",
              f"{embeddings[0].path} is tied to the output head in this model: mlx-lm applies an "
              "embedding adapter to the head too, PEFT does not, so the model would change")


def _adapter_config(peft: PeftAdapterConfig, chosen: list[ModuleInfo],
                    all_modules: list[ModuleInfo], total: int, model: nn.Module,
                    v: Violations) -> AdapterConfig:
    """The AdapterConfig that selects exactly the adapted modules, in mlx-lm's terms."""
    blocks = sorted({m.block for m in chosen if m.block is not None})
    first = blocks[0] if blocks else 0
    wanted_blocks = set(range(first, total))
    by_key: dict[str, set[int]] = {}
    for m in chosen:
        if m.block is not None:
            by_key.setdefault(m.relative, set()).add(m.block)
    for key, have in by_key.items():
        if have != wanted_blocks:
            v.add(f"{PEFT_WEIGHTS}", f"{key} is adapted in layers {_ranges(have)}; mlx-lm's "
                  f"adapter format adapts the same modules in each of the last N layers "
                  f"(here {_ranges(wanted_blocks)})")
    base = AdapterConfig(method="dora" if peft.use_dora else "lora", rank=peft.rank,
                         alpha=peft.alpha, use_rslora=peft.use_rslora, dropout=peft.dropout,
                         num_layers=total - first)
    if v:
        return base
    wanted = {m.path for m in chosen}
    # PEFT's own names read best ("q_proj"); block-relative paths are exact.
    candidates = [peft.target_modules or [], sorted({m.relative for m in chosen})]
    for names in candidates:
        config = _replace_targets(base, names)
        if names and not config.violations(total):
            try:
                selected = select_modules(model, config.with_defaults(total))
            except InvalidArgument:
                continue
            if {m.path for m in selected.modules} == wanted:
                return config
    v.add(PEFT_WEIGHTS, "the adapted modules cannot be expressed as module names over the "
          f"last {total - first} layers: {', '.join(sorted(wanted)[:6])}")
    return base


def _check_tensors(model: nn.Module, selection: Selection, config: AdapterConfig,
                   peft: PeftAdapterConfig, weights: dict[str, mx.array],
                   origin: dict[str, str], v: Violations) -> None:
    expected = dict(tree_flatten(model.parameters()))
    leaves = ("lora_a", "lora_b", "m") if config.method == "dora" else ("lora_a", "lora_b")
    for m in selection.modules:
        for leaf in leaves:
            if f"{m.path}.{leaf}" not in weights:
                v.add(PEFT_WEIGHTS, f"no tensor {peft_key(m.path, layer_kind(m), leaf)}")
    ranks = set()
    for name, value in weights.items():
        where = f"{PEFT_WEIGHTS}[{origin[name]}]"
        if name.endswith(".m") and config.method != "dora":
            v.add(where, f"a DoRA magnitude, but {PEFT_CONFIG} has use_dora false")
            continue
        if name.endswith(".lora_a") and value.ndim == 2:
            ranks.add(value.shape[-1])
        want = expected[name].shape
        if tuple(value.shape) != tuple(want):
            v.add(where, f"expected shape {peft_shape(name, want)}, got "
                  f"{peft_shape(name, value.shape)}")
        elif value.dtype not in _FLOAT_TYPES:
            v.add(where, f"dtype {value.dtype} is not float32, float16 or bfloat16")
        elif not mx.all(mx.isfinite(value)).item():
            v.add(where, "contains NaN or infinite values")
    if ranks and ranks != {peft.rank}:
        v.add(f"{PEFT_CONFIG}.r", f"r is {peft.rank}, but the tensors have rank "
              f"{', '.join(map(str, sorted(ranks)))}")


def _replace_targets(config: AdapterConfig, names: list[str]) -> AdapterConfig:
    return replace(config, target_modules=tuple(names))


def _ranges(indices: set[int]) -> str:
    items = sorted(indices)
    if not items:
        return "none"
    if items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}" if len(items) > 1 else str(items[0])
    return ", ".join(map(str, items))

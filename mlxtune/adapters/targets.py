"""Which modules of a model adapters can target, and which a config selects.

Matching follows Hugging Face PEFT: a target name selects every module whose
path equals it or ends with ``"." + name``; ``"all-linear"`` selects every
linear layer except the output head. The selection is also expressed as
mlx-lm's ``keys`` (paths relative to a transformer block, plus top-level
paths), so ``mlx_lm.tuner.utils.linear_to_lora_layers`` applies it and
mlx-lm's own loader can re-create it from adapter_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mlxtune.adapters.config import ALL_LINEAR, AdapterConfig
from mlxtune.errors import Violations

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
EMBEDDING_TYPES = (nn.Embedding, nn.QuantizedEmbedding)
# Names of output heads, which "all-linear" leaves alone as PEFT does.
OUTPUT_HEADS = ("lm_head", "output", "embed_out")


@dataclass(frozen=True)
class ModuleInfo:
    """One adaptable module of a model."""

    path: str  # full path, e.g. "model.layers.0.self_attn.q_proj"
    layer_type: str
    in_features: int
    out_features: int
    block: int | None  # index into model.layers, None outside the blocks
    relative: str  # path inside its block, or the full path outside blocks

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def is_linear(self) -> bool:
        return self.layer_type in {t.__name__ for t in LINEAR_TYPES}


@dataclass
class Selection:
    """The modules a config adapts, in the forms PEFT and mlx-lm use."""

    modules: list[ModuleInfo] = field(default_factory=list)
    mlx_keys: list[str] = field(default_factory=list)
    peft_targets: list[str] = field(default_factory=list)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features), un-packing quantized weights."""
    weight = module.weight
    bits = getattr(module, "bits", None)
    if isinstance(module, EMBEDDING_TYPES):
        num, dims = weight.shape[-2:]
        return num, dims * 32 // bits if bits else dims
    out_dims, in_dims = weight.shape[-2:]
    return (in_dims * 32 // bits if bits else in_dims), out_dims


def adaptable_modules(model: nn.Module) -> list[ModuleInfo]:
    """Every linear and embedding layer, with its block index."""
    block_of = {id(block): i for i, block in enumerate(model.layers)}
    block_paths: dict[str, int] = {}
    out = []
    for path, module in model.named_modules():
        if id(module) in block_of:
            block_paths[path] = block_of[id(module)]
    for path, module in sorted(model.named_modules(), key=lambda item: _natural(item[0])):
        if not isinstance(module, LINEAR_TYPES + EMBEDDING_TYPES):
            continue
        block, relative = None, path
        for prefix, index in block_paths.items():
            if path.startswith(prefix + "."):
                block, relative = index, path[len(prefix) + 1:]
                break
        in_f, out_f = module_dims(module)
        out.append(ModuleInfo(path, type(module).__name__, in_f, out_f, block, relative))
    return out


@dataclass
class TargetGroup:
    """Modules of one name, type and shape: one entry of InspectModel's targetable list."""

    name: str
    layer_type: str
    count: int
    in_features: int
    out_features: int


def group_targets(modules: list[ModuleInfo]) -> list[TargetGroup]:
    """The modules grouped by name, type and shape, in model order."""
    groups: dict[tuple, TargetGroup] = {}
    for m in modules:
        key = (m.leaf, m.layer_type, m.in_features, m.out_features)
        if key not in groups:
            groups[key] = TargetGroup(m.leaf, m.layer_type, 0, m.in_features, m.out_features)
        groups[key].count += 1
    return list(groups.values())


def select_modules(model: nn.Module, config: AdapterConfig, v: Violations | None = None, *,
                   candidates: list[ModuleInfo] | None = None, scope: str = "") -> Selection:
    """The modules `config` (effective, defaults filled) adapts.

    `candidates` narrows the search (e.g. to some towers of a vision-language
    model; `scope` then says which, in error messages). Raises InvalidArgument
    with every problem found here and in `v` (problems the caller found
    already, so one error lists them all).
    """
    modules = candidates if candidates is not None else adaptable_modules(model)
    total = len(model.layers)
    first_block = max(0, total - (config.num_layers or total))
    in_range = [m for m in modules if m.block is None or m.block >= first_block]
    v = v if v is not None else Violations()
    targets = list(config.target_modules)
    order = {m.path: i for i, m in enumerate(modules)}
    if targets == [ALL_LINEAR]:
        chosen = [m for m in in_range if m.is_linear and m.leaf not in OUTPUT_HEADS]
        # PEFT refuses "all-linear" together with layers_to_transform, so the
        # file names the selected layers explicitly.
        peft_targets = available_names(chosen)
    else:
        chosen, peft_targets = [], targets
        for i, name in enumerate(targets):
            hits = [m for m in in_range if m.path == name or m.path.endswith("." + name)]
            if not hits:
                v.add(f"adapter_config.target_modules[{i}]",
                      f"{name!r} matches no module{scope}; "
                      f"available: {', '.join(available_names(modules))}")
            chosen += [m for m in hits if m not in chosen]
    if not targets:
        v.add("adapter_config.target_modules", "no target modules given")
    if config.method != "full":
        for m in chosen:
            limit = min(m.in_features, m.out_features)
            if config.rank > limit:
                v.add("adapter_config.rank",
                      f"rank {config.rank} exceeds {m.path} ({m.in_features}x{m.out_features}); "
                      f"at most {limit}")
                break
    chosen.sort(key=lambda m: order[m.path])
    _check_uniform_blocks(chosen, first_block, total, v)
    v.raise_if_any(reason="INVALID_ADAPTER_CONFIG")
    keys = sorted({m.relative for m in chosen})
    return Selection(modules=chosen, mlx_keys=keys, peft_targets=peft_targets)


def available_names(modules: list[ModuleInfo]) -> list[str]:
    """Distinct module names a user can target, in model order."""
    names: list[str] = []
    for m in modules:
        if m.leaf not in names:
            names.append(m.leaf)
    return names


def _natural(path: str) -> list:
    """Sort key: "layers.2" before "layers.10"."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _check_uniform_blocks(chosen: list[ModuleInfo], first: int, total: int, v: Violations) -> None:
    # mlx-lm's adapter format names modules relative to a block, so a selection
    # must pick the same modules in every selected block.
    blocks_by_key: dict[str, set[int]] = {}
    for m in chosen:
        if m.block is not None:
            blocks_by_key.setdefault(m.relative, set()).add(m.block)
    wanted = set(range(first, total))
    for key, blocks in blocks_by_key.items():
        if blocks != wanted:
            v.add("adapter_config.target_modules",
                  f"{key!r} is selected in only some layers; target names must select the "
                  "same modules in every layer (use num_layers to limit layers)")
            return

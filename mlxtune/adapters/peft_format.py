"""Hugging Face PEFT's adapter layout, to and from mlx-lm's.

The two hold the same numbers under different names and orientations:

    mlx-lm (adapters.safetensors)            PEFT (adapter_model.safetensors)
    <path>.lora_a  (in, r)                   base_model.model.<path>.lora_A.weight      (r, in)
    <path>.lora_b  (r, out)                  base_model.model.<path>.lora_B.weight      (out, r)
    <path>.m       (out,)   DoRA             base_model.model.<path>.lora_magnitude_vector (out,)
    embedding <path>.lora_a (num, r)         base_model.model.<path>.lora_embedding_A   (r, num)
    embedding <path>.lora_b (r, dims)        base_model.model.<path>.lora_embedding_B   (dims, r)

(names as PEFT 0.21's ``get_peft_model_state_dict`` writes them). Converting
is a transpose, so a round trip is bit-exact, and each tensor keeps its dtype.
mlx-lm multiplies the update by ``scale``; PEFT by ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA), so ``lora_alpha`` is derived from
the scale the model actually runs with.

This module is pure name/shape/config logic; checking an adapter against a
model lives in :mod:`mlxtune.adapters.peft_import`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx

from mlxtune.adapters.targets import ModuleInfo
from mlxtune.errors import Violations

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

LINEAR, EMBEDDING = "linear", "embedding"
# (layer kind, mlx-lm leaf) -> PEFT suffix.
_PEFT_SUFFIX = {
    (LINEAR, "lora_a"): "lora_A.weight",
    (LINEAR, "lora_b"): "lora_B.weight",
    (LINEAR, "m"): "lora_magnitude_vector",
    (EMBEDDING, "lora_a"): "lora_embedding_A",
    (EMBEDDING, "lora_b"): "lora_embedding_B",
}
_FROM_SUFFIX = {suffix: key for key, suffix in _PEFT_SUFFIX.items()}
# PEFT releases before 0.12 wrote the magnitude as a module's weight.
_FROM_SUFFIX["lora_magnitude_vector.weight"] = (LINEAR, "m")
_SUFFIX_PATTERN = re.compile(
    r"^(?P<path>.+)\.(?P<suffix>" + "|".join(re.escape(s) for s in
                                               sorted(_FROM_SUFFIX, key=len, reverse=True))
    + r")$")

# PEFT config fields whose non-default values change what the weights mean
# (or add weights mlx-lm has no place for): refused on import, never written.
_UNSUPPORTED = {
    "bias": ("none", "trains bias vectors"),
    "modules_to_save": (None, "stores whole modules besides the adapter"),
    "fan_in_fan_out": (False, "stores transposed (Conv1D-style) matrices"),
    "rank_pattern": ({}, "gives modules their own rank"),
    "alpha_pattern": ({}, "gives modules their own alpha"),
    "layer_replication": (None, "duplicates layers"),
    "lora_bias": (False, "trains a bias on lora_B"),
    "use_qalora": (False, "is a quantization-aware variant"),
    "target_parameters": (None, "adapts parameters instead of modules"),
    "trainable_token_indices": (None, "trains token embeddings separately"),
    "alora_invocation_tokens": (None, "is an activated-LoRA variant"),
    "use_bdlora": (None, "is a block-diagonal variant"),
}


def peft_key(module_path: str, kind: str, leaf: str) -> str:
    """PEFT's tensor name for mlx-lm's `leaf` ("lora_a", "lora_b", "m") of a module."""
    return f"{PEFT_PREFIX}{module_path}.{_PEFT_SUFFIX[(kind, leaf)]}"


def parse_peft_key(key: str) -> tuple[str, str, str] | None:
    """(module path, layer kind, mlx-lm leaf) of a PEFT tensor name, or None."""
    if not key.startswith(PEFT_PREFIX):
        return None
    match = _SUFFIX_PATTERN.match(key[len(PEFT_PREFIX):])
    if match is None:
        return None
    kind, leaf = _FROM_SUFFIX[match["suffix"]]
    return match["path"], kind, leaf


def layer_kind(module: ModuleInfo) -> str:
    return EMBEDDING if "Embedding" in module.layer_type else LINEAR


def mlx_to_peft_weights(weights: dict[str, mx.array],
                        kinds: dict[str, str]) -> dict[str, mx.array]:
    """mlx-lm adapter tensors as PEFT's; `kinds` maps module path -> LINEAR/EMBEDDING."""
    out = {}
    for name, value in weights.items():
        path, leaf = name.rsplit(".", 1)
        kind = kinds[path]
        out[peft_key(path, kind, leaf)] = value if leaf == "m" else value.T
    return out


def peft_to_mlx_weights(tensors: dict[str, mx.array]) -> tuple[
        dict[str, mx.array], dict[str, str], dict[str, str], list[str]]:
    """(mlx-lm tensors, {module path: kind}, {mlx-lm name: PEFT name}, unrecognised names)."""
    weights, kinds, origin, unknown = {}, {}, {}, []
    for key, value in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        path, kind, leaf = parsed
        name = f"{path}.{leaf}"
        weights[name] = value if leaf == "m" else value.T
        kinds.setdefault(path, kind)
        origin[name] = key
    return weights, kinds, origin, unknown


def peft_shape(mlx_name: str, shape: Iterable[int]) -> tuple[int, ...]:
    """The shape PEFT stores an mlx-lm tensor in (matrices are transposed)."""
    shape = tuple(shape)
    return shape if mlx_name.endswith(".m") else shape[::-1]


def alpha_for_scale(scale: float, rank: int, use_rslora: bool, alpha: float | None) -> float:
    """PEFT's lora_alpha giving `scale`; the configured alpha when it already does."""
    derived = scale * (math.sqrt(rank) if use_rslora else rank)
    if alpha is not None and math.isclose(alpha, derived, rel_tol=1e-9):
        return alpha
    return derived


def peft_selected_paths(modules: Iterable[ModuleInfo], target_modules: list[str],
                        layers_to_transform: list[int] | None) -> set[str]:
    """The module paths PEFT's matching picks (name or "."-suffix, then layer index)."""
    chosen = set()
    for m in modules:
        if not any(m.path == t or m.path.endswith("." + t) for t in target_modules):
            continue
        if layers_to_transform is not None:
            # PEFT reads the layer index from the path ("….layers.3.…") and
            # skips modules outside the numbered layers.
            found = re.match(r".*\.[^.]*\.(\d+)\.", m.path)
            if found is None or int(found[1]) not in layers_to_transform:
                continue
        chosen.add(m.path)
    return chosen


def peft_targets(chosen: list[ModuleInfo], all_modules: list[ModuleInfo],
                 names: list[str], total_layers: int,
                 num_layers: int) -> tuple[list[str], list[int] | None]:
    """target_modules and layers_to_transform that make PEFT adapt exactly `chosen`.

    The readable form (the checkpoint's own names plus a layer range) is used
    when it selects the same modules under PEFT's rules; otherwise every
    module's full path, which PEFT matches exactly.
    """
    wanted = {m.path for m in chosen}
    first = total_layers - num_layers
    layers = None if first <= 0 else list(range(first, total_layers))
    if names and peft_selected_paths(all_modules, names, layers) == wanted:
        return list(names), layers
    return [m.path for m in chosen], None


def peft_config_dict(*, rank: int, alpha: float, dropout: float, use_rslora: bool,
                     use_dora: bool, target_modules: list[str],
                     layers_to_transform: list[int] | None, base_model: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (fields we rely on spelled out)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


@dataclass(frozen=True)
class PeftAdapterConfig:
    """What an imported adapter_config.json says, in the fields mlxtune uses."""

    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    use_dora: bool
    target_modules: list[str] | None  # None: a regex string or absent
    layers_to_transform: list[int] | None
    base_model_name_or_path: str

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_peft_config(data: dict, v: Violations,
                      field_prefix: str = PEFT_CONFIG) -> PeftAdapterConfig | None:
    """The config's LoRA settings; every unsupported or invalid field goes to `v`."""
    def bad(name: str, why: str) -> None:
        v.add(f"{field_prefix}.{name}", why)

    if not isinstance(data, dict):
        bad("", "must be a JSON object")
        return None
    if data.get("peft_type", "LORA") != "LORA":
        bad("peft_type", f"{data.get('peft_type')!r} adapters are not supported; only LORA")
    for name, (default, what) in _UNSUPPORTED.items():
        value = data.get(name, default)
        if value not in (default, None, False, {}, [], ""):
            bad(name, f"{value!r} is not supported: it {what}, which mlx-lm's adapter "
                "layers cannot hold")
    rank, alpha = data.get("r", 8), data.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        bad("r", f"must be a positive integer, got {rank!r}")
    if not _number(alpha) or alpha <= 0:
        bad("lora_alpha", f"must be a positive number, got {alpha!r}")
    dropout = data.get("lora_dropout", 0.0) or 0.0
    if not _number(dropout) or not 0.0 <= dropout < 1.0:
        bad("lora_dropout", f"must be in [0, 1), got {dropout!r}")
    flags = {}
    for name in ("use_rslora", "use_dora"):
        flags[name] = data.get(name, False) or False
        if not isinstance(flags[name], bool):
            bad(name, f"must be true or false, got {flags[name]!r}")
    targets = data.get("target_modules")
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list)
                                   and all(isinstance(i, int) for i in layers)):
        bad("layers_to_transform", f"must be a list of layer indices, got {layers!r}")
    if any(item.field.startswith(field_prefix) for item in v.items):
        return None
    return PeftAdapterConfig(
        rank=rank, alpha=float(alpha), dropout=float(dropout),
        use_rslora=flags["use_rslora"], use_dora=flags["use_dora"],
        target_modules=list(targets) if isinstance(targets, list) else None,
        layers_to_transform=layers,
        base_model_name_or_path=str(data.get("base_model_name_or_path") or ""))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)

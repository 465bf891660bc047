"""Towers of a VLM: what each holds, which of its modules a config adapts, counts.

Selection follows the text path's rules (PEFT's suffix matching,
"all-linear" without the output head, the same rank checks) applied only to
the modules of the selected towers, so ``"q_proj"`` or ``"all-linear"`` never
reaches into the vision tower unless the config names that tower.
``num_layers`` limits the language model's blocks, as for text models; a
selected vision tower is adapted in every block.

Selected modules are expressed as mlx-lm keys: paths relative to a language
block, full paths for everything else. mlx-lm's ``linear_to_lora_layers``
applies both forms (relative keys to ``model.layers``, which on mlx-vlm
models are the language blocks; full keys to the whole model), so its LoRA and
DoRA layers, and its ``load_adapters``, serve VLMs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.adapters.apply import local_parameter_count
from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.targets import (
    Selection,
    TargetGroup,
    adaptable_modules,
    group_targets,
    select_modules,
)
from mlxtune.errors import FailedPrecondition, Violations
from mlxtune.vlm.families import Tower, VlmFamily


@dataclass
class TowerReport:
    """InspectModel's TowerInfo."""

    tower: Tower
    module: str
    num_layers: int
    parameters: int
    targetable: list[TargetGroup] = field(default_factory=list)


@dataclass
class TowerCount:
    """ParameterReport's TowerParameters."""

    tower: Tower
    trainable: int
    total: int

    def to_dict(self) -> dict:
        return {"tower": self.tower.value, "trainable": self.trainable, "total": self.total}


def resolve_path(model: nn.Module, path: str):
    """The module (or list) at a dotted path; list items by their index."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node


def tower_reports(model: nn.Module, family: VlmFamily) -> list[TowerReport]:
    """Every tower with its module path, block count, parameters and targets."""
    modules = adaptable_modules(model)
    totals = _tower_totals(model, family)
    reports = []
    for tower, layout in family.towers.items():
        blocks = len(resolve_path(model, layout.blocks)) if layout.blocks else 0
        own = [m for m in modules if family.tower_of(m.path) is tower]
        reports.append(TowerReport(tower, layout.module, blocks, totals[tower],
                                   group_targets(own)))
    return reports


def tower_counts(model: nn.Module, family: VlmFamily) -> list[TowerCount]:
    """Trainable and total parameters per tower, as PEFT counts them: a
    tower's total includes the adapters placed on it."""
    totals = _tower_totals(model, family)
    trainable = dict.fromkeys(family.towers, 0)
    for name, value in tree_flatten(model.trainable_parameters()):
        trainable[family.tower_of(name) or Tower.LANGUAGE] += value.size
    return [TowerCount(t, trainable[t], totals[t]) for t in family.towers]


def _tower_totals(model: nn.Module, family: VlmFamily) -> dict[Tower, int]:
    # Each module counts only the parameters it owns (a LoRA layer: its A and
    # B; its wrapped base layer: the weights), so the sum over modules is every
    # parameter once, quantized weights at their logical size.
    totals = dict.fromkeys(family.towers, 0)
    for path, module in model.named_modules():
        # Parameters outside every tower (none in the supported families) count
        # as the language model's, so the towers always add up to the model.
        totals[family.tower_of(path) or Tower.LANGUAGE] += local_parameter_count(module)
    return totals


def select_vlm_modules(model: nn.Module, family: VlmFamily, config: AdapterConfig,
                       towers: tuple[Tower, ...], v: Violations | None = None) -> Selection:
    """The modules `config` (effective) adapts within `towers`.

    Raises InvalidArgument listing every problem, those already in `v` too."""
    candidates = [m for m in adaptable_modules(model) if family.tower_of(m.path) in towers]
    return select_modules(model, config, v, candidates=candidates,
                          scope=f" of the towers {', '.join(t.value for t in towers)}")


def unfreeze_towers_for_full(model: nn.Module, family: VlmFamily, towers: tuple[Tower, ...],
                             num_layers: int) -> None:
    """Full fine-tuning: every parameter of the selected towers trains (of the
    language model, only the last `num_layers` blocks when that is fewer than all)."""
    quantized = [p for p, m in model.named_modules() if hasattr(m, "bits")
                 and family.tower_of(p) in towers]
    if quantized:
        raise FailedPrecondition(
            message=f"full fine-tuning needs unquantized weights, but {quantized[0]} and "
            f"{len(quantized) - 1} more modules are quantized; use LoRA or DoRA",
            reason="QUANTIZED_FULL_FINE_TUNE")
    model.freeze()
    for tower in towers:
        layout = family.towers[tower]
        if tower is Tower.LANGUAGE and num_layers < len(model.layers):
            for block in model.layers[len(model.layers) - num_layers:]:
                block.unfreeze()
            continue
        resolve_path(model, layout.module).unfreeze()
        for excluded in layout.excludes:
            if family.tower_of(excluded) not in towers:
                resolve_path(model, excluded).freeze()

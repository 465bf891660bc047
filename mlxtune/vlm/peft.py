"""What the PEFT service asks of a model, tower by tower, for text and VLMs alike.

Text models have one tower, the language model (the whole model); VLMs
report language, vision and projector. ``prepare_adapters`` is the PEFT
core's one call for placing adapters and counting parameters, so the text
path keeps its own functions (``get_peft_model``, ``count_parameters``)
and VLMs take the tower-aware ones.
"""

from __future__ import annotations

import mlx.nn as nn

from mlxtune.adapters.apply import ParameterReport, count_parameters, get_peft_model
from mlxtune.adapters.config import AdapterConfig
from mlxtune.adapters.targets import Selection, adaptable_modules, group_targets
from mlxtune.errors import Violations
from mlxtune.models.spec import ModelSpec
from mlxtune.vlm.families import Tower
from mlxtune.vlm.towers import TowerCount, TowerReport, tower_counts, tower_reports


def _family(spec: ModelSpec):
    return getattr(spec, "family", None)


def inspect_towers(spec: ModelSpec) -> list[TowerReport]:
    """InspectModel's towers: one language tower ("" = the whole model) for text."""
    family = _family(spec)
    if family is not None:
        return tower_reports(spec.model, family)
    model: nn.Module = spec.model
    return [TowerReport(Tower.LANGUAGE, "", spec.num_layers, count_parameters(model).total,
                        group_targets(adaptable_modules(model)))]


def prepare_adapters(spec: ModelSpec, config: AdapterConfig, problems: Violations
                     ) -> tuple[Selection, ParameterReport, list[TowerCount]]:
    """Place `config`'s (effective) adapters on the spec's model; count what trains.

    Raises InvalidArgument listing every problem, `problems` included."""
    towers = tuple(Tower(t) for t in config.towers if t in Tower._value2member_map_)
    family = _family(spec)
    if family is None:
        if set(config.towers) - {Tower.LANGUAGE.value}:
            problems.add("adapter_config.towers",
                         f"{spec.source.name!r} is a text model: it has only the language tower")
        selection = get_peft_model(spec.model, config, problems)
        report = count_parameters(spec.model, selection)
        return selection, report, [TowerCount(Tower.LANGUAGE, report.trainable, report.total)]
    from mlxtune.vlm.models import get_vlm_peft_model

    selection = get_vlm_peft_model(spec.model, family, config, towers, problems)
    report = count_parameters(spec.model, selection)
    counts = tower_counts(spec.model, family)
    # PEFT's "all params" counts parameters only; mlx-vlm layers also hold
    # buffers (rotary tables) that count_parameters would add.
    report.total = sum(c.total for c in counts)
    return selection, report, counts


def towers_dict(counts: list[TowerCount]) -> list[dict]:
    return [c.to_dict() for c in counts]

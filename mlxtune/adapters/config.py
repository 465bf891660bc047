"""The adapter configuration: every knob with its default, in one dataclass.

Semantics follow Hugging Face PEFT's ``LoraConfig`` so users moving between
tools get what they expect: ``scale = alpha / rank`` (``alpha / sqrt(rank)``
with rsLoRA), target modules matched by name suffix or ``"all-linear"``.
The same dataclass writes ``adapter_config.json`` in a form both PEFT and
mlx-lm read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from mlxtune.errors import Violations

ALL_LINEAR = "all-linear"
METHODS = ("lora", "dora", "full")
TOWERS = ("language", "vision", "projector")


@dataclass(frozen=True)
class AdapterConfig:
    """How to adapt a model. None means "use the default" for optional knobs."""

    method: str = "lora"
    """"lora", "dora" or "full" (every parameter of the selected blocks trains)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float | None = None
    """PEFT's lora_alpha; default 2 * rank."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training, in [0, 1)."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Module names (suffix match) or ("all-linear",)."""
    num_layers: int | None = None
    """Adapt only the last num_layers transformer blocks; None = all."""
    seed: int = 0
    """Seed of the initial adapter weights."""
    towers: tuple[str, ...] = ("language",)
    """Vision-language models: the towers that get adapters ("language",
    "vision", "projector"); text models have only "language"."""

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def scale(self) -> float:
        """The factor the low-rank update is multiplied by."""
        if self.use_rslora:
            return self.effective_alpha / math.sqrt(self.rank)
        return self.effective_alpha / self.rank

    def with_defaults(self, total_layers: int) -> "AdapterConfig":
        """The effective configuration: every default filled in."""
        return replace(
            self,
            alpha=self.effective_alpha,
            num_layers=self.num_layers if self.num_layers is not None else total_layers,
            target_modules=tuple(self.target_modules) or (ALL_LINEAR,),
            # One order whatever the request's, so the same towers give the same id.
            towers=tuple(sorted(set(self.towers), key=_tower_order)) or ("language",),
        )

    def validate(self, total_layers: int | None = None) -> None:
        """Raise InvalidArgument listing every problem that needs no model to see."""
        self.violations(total_layers).raise_if_any(reason="INVALID_ADAPTER_CONFIG")

    def violations(self, total_layers: int | None = None) -> Violations:
        """Every problem of the config that needs no model to see."""
        v = Violations()
        v.check(self.method in METHODS, "adapter_config.method",
                f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method != "full":
            v.check(self.rank >= 1, "adapter_config.rank", f"rank must be >= 1, got {self.rank}")
            v.check(self.alpha is None or (math.isfinite(self.alpha) and self.alpha > 0),
                    "adapter_config.alpha", f"alpha must be a positive number, got {self.alpha}")
            v.check(math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0,
                    "adapter_config.dropout", f"dropout must be in [0, 1), got {self.dropout}")
        targets = list(self.target_modules)
        if ALL_LINEAR in targets and len(targets) > 1:
            v.add("adapter_config.target_modules",
                  f"{ALL_LINEAR!r} cannot be combined with other names")
        for i, name in enumerate(targets):
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                v.add(f"adapter_config.target_modules[{i}]",
                      f"{name!r} is not a module name (letters, digits, '.', '_', '-')")
        towers = list(self.towers)
        for i, tower in enumerate(towers):
            if tower not in TOWERS:
                v.add(f"adapter_config.towers[{i}]",
                      f"unknown tower {tower!r}; use {', '.join(TOWERS)}")
        if len(set(towers)) != len(towers):
            v.add("adapter_config.towers", "a tower is named more than once")
        if self.num_layers is not None:
            if self.num_layers < 1:
                v.add("adapter_config.num_layers",
                      f"num_layers must be >= 1 (or unset for all), got {self.num_layers}")
            elif total_layers is not None and self.num_layers > total_layers:
                v.add("adapter_config.num_layers",
                      f"the model has {total_layers} layers, num_layers is {self.num_layers}")
        return v

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        # Recorded only when not the default, so text models' checkpoint ids
        # (a hash of this dict) stay what they were before towers existed.
        towers = list(self.towers)
        if towers == ["language"] or not towers:
            del d["towers"]
        else:
            d["towers"] = towers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        d["target_modules"] = tuple(d.get("target_modules") or (ALL_LINEAR,))
        d["towers"] = tuple(d.get("towers") or ("language",))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _tower_order(tower: str) -> tuple[int, str]:
    return (TOWERS.index(tower) if tower in TOWERS else len(TOWERS), tower)


@dataclass
class AdapterFileConfig:
    """What goes into adapter_config.json: readable by PEFT and by mlx-lm."""

    config: AdapterConfig
    total_layers: int
    mlx_keys: list[str]
    """mlx-lm's keys: module paths relative to a block, plus top-level paths."""
    peft_targets: list[str]
    base_model_name_or_path: str
    extra: dict = field(default_factory=dict)

    def to_json_dict(self) -> dict:
        c = self.config
        first = self.total_layers - (c.num_layers or self.total_layers)
        layers = list(range(first, self.total_layers))
        return {
            # Hugging Face PEFT's LoraConfig fields.
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": c.rank,
            "lora_alpha": c.effective_alpha,
            "lora_dropout": c.dropout,
            "target_modules": self.peft_targets,
            "use_dora": c.method == "dora",
            "use_rslora": c.use_rslora,
            "layers_to_transform": None if first == 0 else layers,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "inference_mode": False,
            # mlx-lm's adapter fields (mlx_lm.tuner.utils.load_adapters reads these).
            "fine_tune_type": c.method,
            "num_layers": c.num_layers or self.total_layers,
            "lora_parameters": {
                "rank": c.rank,
                "scale": c.scale,
                "dropout": c.dropout,
                "keys": self.mlx_keys,
            },
            # mlxtune's own record of the configuration as given.
            "mlxtune": {"adapter_config": c.to_dict(), **self.extra},
        }

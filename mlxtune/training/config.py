"""Hyperparameters of a training run: the plain-Python mirror of the proto's
``mlxtune.trainer.v1.TrainingConfig``.

Every field is optional here as in the proto (``None`` = unset);
``with_defaults()`` fills the documented defaults and is what the loop runs
on and what a job reports as its effective configuration. Enum fields hold
the lower-case name of the proto enum value without its prefix
(``OPTIMIZER_ADAMW`` -> ``"adamw"``); ``None`` stands for ``*_UNSPECIFIED``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum

from mlxtune.errors import FieldViolation, Violations


class Optimizer(str, Enum):
    ADAM = "adam"  # Adam, no weight decay
    ADAMW = "adamw"  # Adam with decoupled weight decay
    SGD = "sgd"  # SGD with optional momentum
    ADAFACTOR = "adafactor"  # factored second moments, learning rate from the schedule
    LION = "lion"  # sign-based momentum


class LrSchedule(str, Enum):
    CONSTANT = "constant"
    LINEAR = "linear"  # linear decay to min_learning_rate at the last step
    COSINE = "cosine"  # cosine decay to min_learning_rate at the last step


class NonFinitePolicy(str, Enum):
    FAIL = "fail"  # fail at the first non-finite loss or gradient
    SKIP_STEP = "skip_step"  # skip the update; fail once max_skipped_steps is exceeded


class LossMask(str, Enum):
    COMPLETION = "completion"  # completions / assistant turns; all tokens of plain text
    ALL_TOKENS = "all_tokens"


class ComputeDtype(str, Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


# Field name -> enum class, for coercing strings and proto names.
ENUM_FIELDS = {
    "optimizer": Optimizer,
    "lr_schedule": LrSchedule,
    "non_finite_policy": NonFinitePolicy,
    "loss_mask": LossMask,
    "compute_dtype": ComputeDtype,
}


@dataclass
class TrainingConfig:
    """Hyperparameters of one training job; ``None`` means "use the default"."""

    max_steps: int | None = None  # optimizer steps; default: one epoch when epochs is unset too
    epochs: float | None = None  # epochs over the training set, instead of max_steps
    batch_size: int | None = None  # examples per micro-batch; default 4
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step; default 1
    max_seq_length: int | None = None  # longer examples are truncated; default 2048
    optimizer: Optimizer | None = None  # default ADAMW
    learning_rate: float | None = None  # peak learning rate; default 1e-4
    weight_decay: float | None = None  # decoupled weight decay (AdamW, Lion); default 0.01
    beta1: float | None = None  # Adam/Lion beta1; default 0.9
    beta2: float | None = None  # Adam beta2; default 0.999 (Lion: 0.99)
    epsilon: float | None = None  # Adam epsilon; default 1e-8
    momentum: float | None = None  # SGD momentum; default 0
    bias_correction: bool | None = None  # Adam bias correction; default True (MLX's is False)
    lr_schedule: LrSchedule | None = None  # schedule after warmup; default COSINE
    warmup_steps: int | None = None  # linear warmup from 0, in optimizer steps; default 0
    min_learning_rate: float | None = None  # learning rate at the last step; default 0
    max_grad_norm: float | None = None  # clip to this global L2 norm, 0 disables; default 1.0
    non_finite_policy: NonFinitePolicy | None = None  # default FAIL
    max_skipped_steps: int | None = None  # SKIP_STEP tolerates this many skips; default 10
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    eval_every_steps: int | None = None  # validate every N steps + at the end, 0 = off; default 50
    eval_batches: int | None = None  # validation batches per pass; default 8
    save_every_steps: int | None = None  # checkpoint every N steps, 0 = only the final; default 100
    loss_mask: LossMask | None = None  # default COMPLETION
    seed: int | None = None  # data order, dropout, anything random; default 0
    validation_split: float | None = None  # held-out fraction in [0, 0.5]; default 0.1
    compute_dtype: ComputeDtype | None = None  # default float32 on CPU, bfloat16 on GPU
    compile: bool | None = None  # mx.compile the train step; default True

    def __post_init__(self) -> None:
        # Accept enum members, their values ("adamw") and proto names ("OPTIMIZER_ADAMW").
        for name, enum_cls in ENUM_FIELDS.items():
            value = getattr(self, name)
            if value is None or isinstance(value, enum_cls):
                continue
            setattr(self, name, _coerce_enum(enum_cls, value))

    def with_defaults(self, device: str | None = None) -> "TrainingConfig":
        """A copy with every unset field at its documented default.

        ``device`` ("cpu"/"gpu") picks the compute dtype default; ``None``
        asks MLX for its default device.
        """
        c = dataclasses.replace(self)
        if c.max_steps is None and c.epochs is None:
            c.epochs = 1.0
        optimizer = c.optimizer or Optimizer.ADAMW
        defaults = {
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 2048,
            "optimizer": optimizer,
            "learning_rate": 1e-4,
            "weight_decay": 0.01,
            "beta1": 0.9,
            "beta2": 0.99 if optimizer == Optimizer.LION else 0.999,
            "epsilon": 1e-8,
            "momentum": 0.0,
            "bias_correction": True,
            "lr_schedule": LrSchedule.COSINE,
            "warmup_steps": 0,
            "min_learning_rate": 0.0,
            "max_grad_norm": 1.0,
            "non_finite_policy": NonFinitePolicy.FAIL,
            "max_skipped_steps": 10,
            "eval_every_steps": 50,
            "eval_batches": 8,
            "save_every_steps": 100,
            "loss_mask": LossMask.COMPLETION,
            "seed": 0,
            "validation_split": 0.1,
            "compute_dtype": _default_dtype(device),
            "compile": True,
        }
        for name, value in defaults.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        return c

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps the run takes: max_steps, or epochs of micro-batches
        divided by gradient accumulation (rounded up, at least 1)."""
        c = self.with_defaults(device="cpu")
        if c.max_steps is not None:
            return int(c.max_steps)
        micro_batches = math.ceil(c.epochs * batches_per_epoch)
        return max(1, math.ceil(micro_batches / c.gradient_accumulation_steps))

    def validate(self, num_train_examples: int | None = None) -> None:
        """Raise ``InvalidArgument`` with one violation per bad field.

        ``num_train_examples`` (after any validation hold-out) enables the
        checks that need the data: batch size and warmup against the total.
        """
        v = Violations()
        raw, c = self, self.with_defaults(device="cpu")
        v.check(raw.max_steps is None or raw.epochs is None, "config.epochs",
                "set max_steps or epochs, not both")
        if raw.max_steps is not None:
            v.check(raw.max_steps >= 1, "config.max_steps", f"must be >= 1, got {raw.max_steps}")
        if raw.epochs is not None:
            v.check(_finite(raw.epochs) and raw.epochs > 0, "config.epochs",
                    f"must be a finite number > 0, got {raw.epochs}")
        _at_least(v, "batch_size", c.batch_size, 1)
        _at_least(v, "gradient_accumulation_steps", c.gradient_accumulation_steps, 1)
        _at_least(v, "max_seq_length", c.max_seq_length, 2)
        v.check(_finite(c.learning_rate) and c.learning_rate > 0, "config.learning_rate",
                f"must be a finite number > 0, got {c.learning_rate}")
        _non_negative(v, "weight_decay", c.weight_decay)
        for name in ("beta1", "beta2", "momentum"):
            value = getattr(c, name)
            v.check(_finite(value) and 0.0 <= value < 1.0, f"config.{name}",
                    f"must be in [0, 1), got {value}")
        _non_negative(v, "epsilon", c.epsilon)
        _at_least(v, "warmup_steps", c.warmup_steps, 0)
        _non_negative(v, "min_learning_rate", c.min_learning_rate)
        if _finite(c.min_learning_rate) and _finite(c.learning_rate):
            v.check(c.min_learning_rate <= c.learning_rate, "config.min_learning_rate",
                    f"must not exceed learning_rate ({c.learning_rate}), got {c.min_learning_rate}")
        _non_negative(v, "max_grad_norm", c.max_grad_norm)
        _at_least(v, "max_skipped_steps", c.max_skipped_steps, 0)
        _at_least(v, "eval_every_steps", c.eval_every_steps, 0)
        _at_least(v, "eval_batches", c.eval_batches, 1)
        _at_least(v, "save_every_steps", c.save_every_steps, 0)
        v.check(0 <= c.seed < 2**63, "config.seed", f"must be in [0, 2^63), got {c.seed}")
        v.check(_finite(c.validation_split) and 0.0 <= c.validation_split <= 0.5,
                "config.validation_split", f"must be in [0, 0.5], got {c.validation_split}")
        self._check_against_data(v, c, num_train_examples)
        v.raise_if_any(message=_summary(v.items))

    def _check_against_data(self, v: Violations, c: "TrainingConfig",
                            num_train_examples: int | None) -> None:
        total = None
        if c.max_steps is not None and c.max_steps >= 1:
            total = c.max_steps
        if num_train_examples is not None:
            if num_train_examples < 1:
                v.add("dataset", "has no training examples")
                return
            if c.batch_size >= 1 and c.batch_size > num_train_examples:
                v.add("config.batch_size",
                      f"{c.batch_size} exceeds the {num_train_examples} training examples")
            if total is None and c.batch_size >= 1 and c.gradient_accumulation_steps >= 1 \
                    and _finite(c.epochs) and c.epochs > 0:
                total = c.total_steps(math.ceil(num_train_examples / c.batch_size))
        if total is not None and c.warmup_steps >= total:
            v.add("config.warmup_steps",
                  f"must be less than the {total} total optimizer steps, got {c.warmup_steps}")

    def to_dict(self) -> dict:
        """JSON-ready: enums as their string values."""
        out = dataclasses.asdict(self)
        for name in ENUM_FIELDS:
            if out[name] is not None:
                out[name] = out[name].value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _coerce_enum(enum_cls: type[Enum], value) -> Enum:
    text = str(value.name if isinstance(value, Enum) else value).lower()
    prefix = {
        Optimizer: "optimizer_", LrSchedule: "lr_schedule_",
        NonFinitePolicy: "non_finite_policy_", LossMask: "loss_mask_",
        ComputeDtype: "compute_dtype_",
    }[enum_cls]
    text = text.removeprefix(prefix)
    try:
        return enum_cls(text)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"unknown {enum_cls.__name__} {value!r}; one of: {allowed}") from None


def _default_dtype(device: str | None) -> ComputeDtype:
    # Only float32 matmuls reach a fast BLAS on a CPU; a GPU is fastest in bfloat16.
    if device is None:
        import mlx.core as mx

        device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    return ComputeDtype.FLOAT32 if device == "cpu" else ComputeDtype.BFLOAT16


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _at_least(v: Violations, name: str, value, low: int) -> None:
    v.check(isinstance(value, int) and value >= low, f"config.{name}",
            f"must be an integer >= {low}, got {value}")


def _non_negative(v: Violations, name: str, value) -> None:
    v.check(_finite(value) and value >= 0, f"config.{name}",
            f"must be a finite number >= 0, got {value}")


def _summary(items: list[FieldViolation]) -> str:
    # "field: description", the form the status layer recognises (so it does not repeat them).
    return "invalid training config: " + "; ".join(f"{i.field}: {i.description}" for i in items)

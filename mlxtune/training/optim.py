"""The optimizer and its learning-rate schedule, built from a TrainingConfig.

The schedule is counted in optimizer steps (not micro-batches): MLX's
optimizers evaluate it at their own step counter, which advances once per
applied update. Optimizer step k (1-based) uses ``schedule(k - 1)``.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.optimizers import schedulers

from mlxtune.training.config import LrSchedule, Optimizer, TrainingConfig

Schedule = Callable[[mx.array], mx.array]


def build_schedule(config: TrainingConfig, total_steps: int) -> Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant, linear or
    cosine decay that reaches ``min_learning_rate`` at the last step."""
    c = config.with_defaults(device="cpu")
    peak, end, warmup = float(c.learning_rate), float(c.min_learning_rate), int(c.warmup_steps)
    # Index of the last step's schedule value is total_steps - 1.
    decay_steps = total_steps - 1 - warmup
    if c.lr_schedule == LrSchedule.CONSTANT or decay_steps < 1:
        after_warmup = _constant(peak)
    elif c.lr_schedule == LrSchedule.LINEAR:
        after_warmup = schedulers.linear_schedule(peak, end, decay_steps)
    else:
        after_warmup = schedulers.cosine_decay(peak, decay_steps, end)
    if warmup <= 0:
        return after_warmup
    warmup_schedule = schedulers.linear_schedule(0.0, peak, warmup)
    return schedulers.join_schedules([warmup_schedule, after_warmup], [warmup])


def learning_rate_at(config: TrainingConfig, total_steps: int, step: int) -> float:
    """Learning rate that optimizer step ``step`` (1-based) uses."""
    schedule = build_schedule(config, total_steps)
    return float(schedule(mx.array(max(step - 1, 0), mx.uint64)).item())


def build_optimizer(config: TrainingConfig, total_steps: int) -> optim.Optimizer:
    """The configured MLX optimizer driven by ``build_schedule``.

    Adam and AdamW get ``bias_correction=True`` unless the config says
    otherwise: MLX defaults to False, which is not the Adam that PyTorch and
    PEFT users know (it takes much larger first steps).
    """
    c = config.with_defaults(device="cpu")
    lr = build_schedule(c, total_steps)
    betas = [float(c.beta1), float(c.beta2)]
    if c.optimizer == Optimizer.ADAM:
        return optim.Adam(learning_rate=lr, betas=betas, eps=float(c.epsilon),
                          bias_correction=bool(c.bias_correction))
    if c.optimizer == Optimizer.ADAMW:
        return optim.AdamW(learning_rate=lr, betas=betas, eps=float(c.epsilon),
                           weight_decay=float(c.weight_decay),
                           bias_correction=bool(c.bias_correction))
    if c.optimizer == Optimizer.SGD:
        return optim.SGD(learning_rate=lr, momentum=float(c.momentum))
    if c.optimizer == Optimizer.LION:
        return optim.Lion(learning_rate=lr, betas=betas, weight_decay=float(c.weight_decay))
    if c.optimizer == Optimizer.ADAFACTOR:
        # relative_step/scale_parameter off: the step size is our schedule, as
        # with an explicit learning rate in other frameworks.
        return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False,
                               beta_1=None)
    raise ValueError(f"unknown optimizer {c.optimizer!r}")


def _constant(value: float) -> Schedule:
    def schedule(step):
        return mx.array(value, mx.float32)

    return schedule

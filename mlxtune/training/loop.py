"""The training loop: plain Python over a model whose trainable parameters
are already set (adapters applied, base frozen).

Data comes from ``batch_at(i)``, the i-th micro-batch of the run (any i >= 0;
the data side wraps epochs and reshuffles), so the data position is one
integer and resuming is exact. An optimizer step accumulates
``gradient_accumulation_steps`` micro-batches: gradients of *summed* token
losses, divided once by the step's supervised tokens, so every token weighs
the same however they fall across micro-batches.

A step whose loss or gradient norm is not finite is never applied. With
policy SKIP_STEP it does not count as a step either: the step number, the
schedule and Adam's bias correction see only applied updates, and the next
micro-batches retry it. The run fails once more than ``max_skipped_steps``
steps were skipped.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxtune.data.batch import Batch
from mlxtune.errors import FailedPrecondition
from mlxtune.training.checkpointing import enable_gradient_checkpointing
from mlxtune.training.config import NonFinitePolicy, TrainingConfig
from mlxtune.training.loss import MaskedLoss
from mlxtune.training.metrics import (
    EvalMetrics,
    NonFiniteLoss,
    StepMetrics,
    TrainingCallbacks,
    TrainResult,
)
from mlxtune.training.optim import build_optimizer, learning_rate_at
from mlxtune.training.state import (
    TrainingState,
    capture_rng,
    restore_optimizer_state,
    restore_rng,
)
from mlxtune.training.step import add_grads, build_step_functions


class Trainer:
    """Runs ``config`` on ``model``; ``run()`` trains until the last step,
    a non-finite failure (``NonFiniteLoss``) or ``should_stop()``.

    ``validation_batches``: the fixed validation subset; each pass uses the
    first ``eval_batches`` of them. ``resume``: a state from
    ``load_training_state``; load the matching adapter weights into the model
    first (``restore_trainable_weights``). ``selective_logits=False`` forces
    full logits.
    """

    def __init__(self, model: nn.Module, config: TrainingConfig,
                 batch_at: Callable[[int], Batch], *, batches_per_epoch: int,
                 validation_batches: Sequence[Batch] = (),
                 callbacks: TrainingCallbacks | None = None,
                 resume: TrainingState | None = None, selective_logits: bool = True,
                 loss=None):
        self.config = config.with_defaults()
        self.config.validate()
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        if not tree_flatten(model.trainable_parameters()):
            raise FailedPrecondition(message="the model has no trainable parameters",
                                     reason="NOTHING_TO_TRAIN")
        self.model = model
        self.batch_at = batch_at
        self.batches_per_epoch = batches_per_epoch
        self.validation_batches = list(validation_batches)[: self.config.eval_batches]
        self.callbacks = callbacks or TrainingCallbacks()
        self.total_steps = self.config.total_steps(batches_per_epoch)

        # Set-up that draws no random numbers comes before seeding.
        # `loss`: another loss with MaskedLoss's prepare/__call__ (VLMs bring theirs).
        self.loss = loss or MaskedLoss.for_model(model, selective=selective_logits)
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.optimizer = build_optimizer(self.config, self.total_steps)
        self.optimizer.init(model.trainable_parameters())

        self.step = 0
        self.micro_batch_index = 0
        self.skipped_steps = 0
        self.trained_tokens = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        if resume is None:
            mx.random.seed(self.config.seed)
            np.random.seed(self.config.seed % 2**32)
        else:
            self._resume(resume)
        self.fns = build_step_functions(model, self.optimizer, self.loss,
                                        float(self.config.max_grad_norm),
                                        compile=bool(self.config.compile)
                                        and getattr(self.loss, "compilable", True))

    def _resume(self, state: TrainingState) -> None:
        ours = self.config.to_dict()
        changed = sorted(k for k in ours if state.config.get(k) != ours[k])
        if changed or state.total_steps != self.total_steps:
            raise FailedPrecondition(
                message=("the saved training state belongs to a different run: "
                         f"config fields {changed} or total steps "
                         f"({state.total_steps} saved, {self.total_steps} now) differ"),
                reason="RESUME_STATE_MISMATCH")
        restore_optimizer_state(self.optimizer, self.model.trainable_parameters(),
                                state.optimizer_state)
        self.step = state.step
        self.micro_batch_index = state.micro_batch_index
        self.skipped_steps = state.skipped_steps
        self.trained_tokens = state.trained_tokens
        restore_rng(state.mlx_rng_key, state.numpy_rng_state)

    # ---- the loop ---------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, cb = self.config, self.callbacks
        if self.step == 0 and self.validation_batches and cfg.eval_every_steps > 0:
            # A baseline before any update, so "validation loss fell" can be read
            # off the events (evaluation draws no random numbers: resume stays exact).
            cb.on_eval(self.evaluate())
        self.model.train()
        stopped = False
        while self.step < self.total_steps:
            if cb.should_stop():
                stopped = True
                break
            metrics = self._train_step()
            cb.on_step(metrics)
            if metrics.skipped:
                continue
            last = self.step == self.total_steps
            if self.validation_batches and cfg.eval_every_steps > 0 and (
                    last or self.step % cfg.eval_every_steps == 0):
                cb.on_eval(self.evaluate())
            if last or (cfg.save_every_steps > 0 and self.step % cfg.save_every_steps == 0):
                cb.on_checkpoint(self.step, self.adapter_weights(), self.training_state())
        return TrainResult(step=self.step, total_steps=self.total_steps, stopped=stopped,
                           loss=self.last_loss, eval_loss=self.last_eval_loss,
                           skipped_steps=self.skipped_steps, trained_tokens=self.trained_tokens,
                           micro_batch_index=self.micro_batch_index)

    def _train_step(self) -> StepMetrics:
        start = time.perf_counter()
        grads, loss_sum = None, mx.array(0.0, mx.float32)
        supervised, real_tokens = 0.0, 0
        for _ in range(self.config.gradient_accumulation_steps):
            batch = self.batch_at(self.micro_batch_index)
            self.micro_batch_index += 1
            part_loss, _, part_grads = self.fns.micro_grads(*self.loss.prepare(batch))
            grads = add_grads(grads, part_grads)
            loss_sum = loss_sum + part_loss
            # Evaluate per micro-batch so only one micro-batch's activations live at a time.
            mx.eval(grads, loss_sum, mx.random.state)
            supervised += float(np.asarray(batch.loss_mask, np.float32)[:, 1:].sum())
            real_tokens += batch.num_tokens
        inv_tokens = mx.array(1.0 / max(supervised, 1.0), mx.float32)
        grads, norm = self.fns.finish(grads, inv_tokens)
        mx.eval(grads, norm)
        loss = float(loss_sum.item()) / max(supervised, 1.0)
        grad_norm = float(norm.item())

        attempted = self.step + 1
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._on_non_finite(attempted, loss, grad_norm)
            learning_rate = learning_rate_at(self.config, self.total_steps, attempted)
        else:
            learning_rate = float(self.fns.apply(grads).item())
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
            self.step = attempted
            self.trained_tokens += int(round(supervised))
            self.last_loss = loss
        seconds = time.perf_counter() - start
        return StepMetrics(
            step=attempted, total_steps=self.total_steps, loss=loss,
            learning_rate=learning_rate, tokens_per_second=real_tokens / max(seconds, 1e-9),
            trained_tokens=self.trained_tokens, grad_norm=grad_norm, step_seconds=seconds,
            peak_memory_bytes=int(mx.get_peak_memory()),
            epoch=self.micro_batch_index / self.batches_per_epoch, skipped=skipped)

    def _on_non_finite(self, step: int, loss: float, grad_norm: float) -> None:
        cfg = self.config
        details = {"step": str(step), "loss": str(loss), "grad_norm": str(grad_norm)}
        if cfg.non_finite_policy == NonFinitePolicy.FAIL:
            raise NonFiniteLoss(
                message=(f"step {step}: loss {loss}, gradient norm {grad_norm} is not finite; "
                         "lower the learning rate, check the data, or set "
                         "non_finite_policy to NON_FINITE_POLICY_SKIP_STEP"),
                metadata=details)
        self.skipped_steps += 1
        if self.skipped_steps > cfg.max_skipped_steps:
            raise NonFiniteLoss(
                message=(f"step {step}: {self.skipped_steps} steps had a non-finite loss or "
                         f"gradient, more than max_skipped_steps={cfg.max_skipped_steps}; "
                         "lower the learning rate or check the data"),
                metadata={**details, "skipped_steps": str(self.skipped_steps)})

    # ---- evaluation and checkpoints --------------------------------------

    def evaluate(self) -> EvalMetrics:
        """Token-weighted mean loss over the fixed validation batches."""
        start = time.perf_counter()
        self.model.eval()
        try:
            loss_sum, tokens = 0.0, 0.0
            for batch in self.validation_batches:
                part_loss, part_tokens = self.fns.eval_loss(*self.loss.prepare(batch))
                mx.eval(part_loss, part_tokens)
                loss_sum += float(part_loss.item())
                tokens += float(part_tokens.item())
        finally:
            self.model.train()
        eval_loss = loss_sum / tokens if tokens > 0 else float("nan")
        self.last_eval_loss = eval_loss
        return EvalMetrics(step=self.step, eval_loss=eval_loss, eval_tokens=int(round(tokens)),
                           eval_seconds=time.perf_counter() - start)

    def adapter_weights(self) -> dict[str, mx.array]:
        """The trainable parameters by their dotted names (what adapters save)."""
        return dict(tree_flatten(self.model.trainable_parameters()))

    def training_state(self) -> TrainingState:
        mlx_key, numpy_state = capture_rng()
        return TrainingState(
            step=self.step, total_steps=self.total_steps,
            micro_batch_index=self.micro_batch_index, skipped_steps=self.skipped_steps,
            trained_tokens=self.trained_tokens,
            optimizer_state=dict(tree_flatten(self.optimizer.state)),
            mlx_rng_key=mlx_key, numpy_rng_state=numpy_state, config=self.config.to_dict())

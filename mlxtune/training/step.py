"""The array work of one training step, optionally under ``mx.compile``.

A step is split in three so the loop can look at the loss and gradient norm
*before* the optimizer touches the weights (the non-finite guard):

1. ``micro_grads(*arrays)``: summed loss, supervised tokens and gradients of
   the summed loss for one micro-batch (dropout draws from mx.random.state);
2. ``finish(grads, inv_tokens)``: divide the accumulated gradients by the
   step's supervised tokens, report their global norm, clip;
3. ``apply(grads)``: the optimizer update.

Compiled functions name the model, optimizer and random state as inputs and
outputs, as MLX requires for state a compiled function reads or changes.
Scalars go in as arrays: a Python number would be baked into the compiled
graph and force a retrace whenever it changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map, tree_reduce

from mlxtune.training.loss import MaskedLoss


@dataclass
class StepFunctions:
    micro_grads: Callable  # (*arrays) -> (loss_sum, n_supervised, grads)
    finish: Callable  # (grads, inv_tokens) -> (clipped grads, norm before clipping)
    apply: Callable  # (grads) -> learning rate used
    eval_loss: Callable  # (*arrays) -> (loss_sum, n_supervised); call in eval mode


def global_norm(grads) -> mx.array:
    # Squares summed in float32 whatever the gradients' dtype (mlx's
    # clip_grad_norm upcasts only float16).
    squares = tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads,
                          mx.array(0.0, mx.float32))
    return mx.sqrt(squares)


def add_grads(accumulated, grads):
    return grads if accumulated is None else tree_map(mx.add, accumulated, grads)


def build_step_functions(model: nn.Module, optimizer: optim.Optimizer, loss: MaskedLoss,
                         max_grad_norm: float, compile: bool = True) -> StepFunctions:
    loss_and_grad = nn.value_and_grad(model, loss)

    def micro_grads(*arrays):
        (loss_sum, n), grads = loss_and_grad(model, *arrays)
        return loss_sum, n, grads

    def finish(grads, inv_tokens):
        grads = tree_map(lambda g: g * inv_tokens.astype(g.dtype), grads)
        norm = global_norm(grads)
        if max_grad_norm > 0:
            scale = mx.minimum(max_grad_norm / (norm + 1e-6), 1.0)
            grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
        return grads, norm

    def apply(grads):
        optimizer.update(model, grads)
        return optimizer.learning_rate

    def eval_loss(*arrays):
        return loss(model, *arrays)

    if not compile:
        return StepFunctions(micro_grads, finish, apply, eval_loss)

    grad_state = [model.state, mx.random.state]
    update_state = [model.state, optimizer.state]
    return StepFunctions(
        micro_grads=mx.compile(micro_grads, inputs=grad_state, outputs=grad_state),
        finish=mx.compile(finish),
        apply=mx.compile(apply, inputs=update_state, outputs=update_state),
        eval_loss=mx.compile(eval_loss, inputs=[model.state], outputs=[model.state]),
    )

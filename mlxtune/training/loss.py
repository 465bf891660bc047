"""Masked next-token cross-entropy that returns (sum of losses, supervised tokens).

Returning sums, not means, lets gradient accumulation weight every token
equally however the supervised tokens fall across micro-batches.

Two ways to the same value:

* **selective** (the default where it is safe): run the backbone
  ``model.model(...)`` to hidden states, gather only the supervised
  positions and apply the output head to those rows, in chunks. On a CPU the
  head and the softmax over the vocabulary dominate a LoRA step, and
  padding, prompts and system turns need no logits at all.
* **full**: ``model(inputs)`` logits everywhere, masked. Used for models
  whose head we do not recognise or that transform the logits after the head
  (soft-capping, scaling), where the selective path would be wrong.

``prepare`` turns a ``Batch`` into arrays outside any compiled function; the
number of gathered rows is rounded up to a bucket so ``mx.compile`` sees few
distinct shapes.

Chunking bounds the softmax temporaries, not the saved activations: the
backward pass still holds every chunk's logits (rows x vocab floats).

Measured on a CPU (SmolLM2-shaped llama, vocab 49152, batch 4 x <=128 tokens,
half of each example supervised, LoRA r8, float32 + OpenBLAS on 2 pinned cores
of a quiet x86 host), median step: 4 layers: full 1621 ms eager / 1600
compiled, selective 949 / 935; 30 layers: full 4127 / 3644, selective 2942 /
2931; on the real SmolLM2 through the trainer 1.5x (bench/bench_trainer.py).
On a GPU the head is cheap and full logits are 2-5% faster
(bench/bench_gpu.py, which measures both on any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxtune.data.batch import Batch

# ModelArgs fields of mlx-lm models that change the logits after the head;
# any of them set means the full path.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
    "lm_head_multiplier", "output_multiplier", "mup_width_multiplier", "dim_model_base",
)


def find_output_head(model: nn.Module) -> str | None:
    """"lm_head" or "tied" when ``model(x) == head(model.model(x))`` holds for
    this model, else None (use full logits)."""
    args = getattr(model, "args", None)
    if any(getattr(args, name, None) for name in _LOGIT_TRANSFORMS):
        return None
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        return None
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        kind = "lm_head"
    elif hasattr(getattr(backbone, "embed_tokens", None), "as_linear"):
        kind = "tied"
    else:
        return None
    return kind if _head_matches(model, kind) else None


def _head_matches(model: nn.Module, kind: str) -> bool:
    # A numerical check catches heads that do something we did not list.
    # Eval mode: no dropout, so no random numbers are drawn.
    was_training = model.training
    model.eval()
    try:
        vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 256)
        tokens = mx.array(np.arange(1, 9, dtype=np.int32)[None] % vocab)
        expected = model(tokens)
        got = apply_head(model, kind, model.model(tokens))
        mx.eval(expected, got)
        if expected.shape != got.shape:
            return False
        scale = max(1.0, float(mx.abs(expected).max().item()))
        return float(mx.abs(expected - got).max().item()) <= 1e-4 * scale
    except Exception:  # noqa: BLE001 - any failure means "not the simple shape"
        return False
    finally:
        model.train(was_training)


def apply_head(model: nn.Module, kind: str, hidden: mx.array) -> mx.array:
    if kind == "lm_head":
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def full_logits_loss(model, inputs, targets, weights, upcast: bool = True):
    """(sum of weighted token losses, sum of weights) from full logits."""
    logits = model(inputs)
    if upcast:
        logits = logits.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets) * weights
    return ce.astype(mx.float32).sum(), weights.sum()


def selective_logits_loss(model, kind, inputs, positions, targets, weights,
                          chunk_size: int = 1024, upcast: bool = True):
    """Same value as ``full_logits_loss`` but with logits only at ``positions``
    (flat indices into the [B, T-1] grid), ``chunk_size`` rows at a time."""
    hidden = model.model(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
    total = mx.array(0.0, mx.float32)
    rows = positions.shape[0]
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        logits = apply_head(model, kind, hidden[start:stop])
        if upcast:
            logits = logits.astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets[start:stop]) * weights[start:stop]
        total = total + ce.astype(mx.float32).sum()
    return total, weights.sum()


def bucket_size(count: int, minimum: int = 64) -> int:
    """``count`` rounded up to a multiple of an eighth of the power of two
    below it: under 12.5% padding rows and eight shapes per octave."""
    if count <= minimum:
        return minimum
    step = max(minimum, (1 << ((count - 1).bit_length() - 1)) // 8)
    return -(-count // step) * step


@dataclass
class MaskedLoss:
    """The loss the loop uses: ``prepare(batch)`` then ``loss(model, *arrays)``.

    ``head`` is "lm_head"/"tied" for the selective path, None for full logits.
    """

    head: str | None
    chunk_size: int = 1024
    bucket_minimum: int = 64
    upcast: bool = True

    @classmethod
    def for_model(cls, model: nn.Module, selective: bool = True, **kwargs) -> "MaskedLoss":
        head = find_output_head(model) if selective else None
        # On a CPU the reduction runs in the logits' dtype; a GPU's fused kernel
        # accumulates half precision in float32 by itself.
        kwargs.setdefault("upcast", mx.default_device().type == mx.DeviceType.cpu)
        return cls(head=head, **kwargs)

    @property
    def selective(self) -> bool:
        return self.head is not None

    def prepare(self, batch: Batch) -> tuple[mx.array, ...]:
        tokens = np.asarray(batch.tokens, dtype=np.int32)
        weights = np.asarray(batch.loss_mask, dtype=np.float32)[:, 1:]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if not self.selective:
            return mx.array(inputs), mx.array(targets), mx.array(weights)
        flat_weights = weights.reshape(-1)
        positions = np.flatnonzero(flat_weights).astype(np.int32)
        rows = bucket_size(len(positions), self.bucket_minimum)
        padded = np.zeros(rows, np.int32)
        padded[: len(positions)] = positions
        row_weights = np.zeros(rows, np.float32)
        row_weights[: len(positions)] = flat_weights[positions]
        row_targets = targets.reshape(-1)[padded]
        return (mx.array(inputs), mx.array(padded), mx.array(row_targets),
                mx.array(row_weights))

    def __call__(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, mx.array]:
        if self.selective:
            return selective_logits_loss(model, self.head, *arrays,
                                         chunk_size=self.chunk_size, upcast=self.upcast)
        return full_logits_loss(model, *arrays, upcast=self.upcast)

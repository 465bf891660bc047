"""Gradient checkpointing for the transformer blocks of one model.

mlx-lm's ``grad_checkpoint`` replaces ``__call__`` on the block's *class*,
which changes every model of that type in the process. Python looks special
methods up on the type, so instead each block of *this* model gets a
one-off subclass whose ``__call__`` recomputes the block in the backward pass
(``mx.checkpoint``). Parameter names and ``isinstance`` checks are unchanged,
and ``disable`` puts the original class back.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_SUBCLASSES: dict[type, type] = {}


def _checkpointed_subclass(cls: type) -> type:
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    base_call = cls.__call__

    def __call__(self, *args, **kwargs):
        def block(params, *args, **kwargs):
            self.update(params)
            return base_call(self, *args, **kwargs)

        return mx.checkpoint(block)(self.trainable_parameters(), *args, **kwargs)

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {
        "__call__": __call__,
        "__module__": cls.__module__,
        "_mlxtune_base_class": cls,
    })
    _SUBCLASSES[cls] = sub
    return sub


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block in ``model.layers``; returns how many."""
    layers = list(getattr(model, "layers", None) or [])
    if not layers:
        raise ValueError(f"{type(model).__name__} has no .layers to checkpoint")
    for layer in layers:
        if getattr(type(layer), "_mlxtune_base_class", None) is None:
            layer.__class__ = _checkpointed_subclass(type(layer))
    return len(layers)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    for layer in list(getattr(model, "layers", None) or []):
        base = getattr(type(layer), "_mlxtune_base_class", None)
        if base is not None:
            layer.__class__ = base

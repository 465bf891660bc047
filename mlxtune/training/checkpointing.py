"""Gradient checkpointing for the transformer blocks of one model.

mlx-lm's ``grad_checkpoint`` replaces ``__call__`` on the block's *class*,
which changes every model of that type in the process. Python looks special
methods up on the type, so instead each block of *this* model gets a
one-off subclass whose ``__call__`` recomputes the block in the backward pass
(``mx.checkpoint``). Parameter names and ``isinstance`` checks are unchanged,
and ``disable`` puts the original class back.

Dropout needs care: the backward pass runs the block again, and dropout that
draws from the global random state would draw *new* masks there, so the
gradients would belong to a different network than the forward pass (mlx-lm's
version has this problem with LoRA dropout). Here each checkpointed call takes
one key from the global state and passes it into the checkpointed function;
inside, the block's dropout modules are swapped for ones that draw from keys
split off it, so the recomputation draws exactly the forward pass's masks.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_SUBCLASSES: dict[type, type] = {}


class _KeyedDropout(nn.Module):
    """nn.Dropout with an explicit random key."""

    def __init__(self, keep: float, key: mx.array):
        super().__init__()
        self._keep = keep
        self._key = key

    def __call__(self, x: mx.array) -> mx.array:
        mask = mx.random.bernoulli(self._keep, x.shape, key=self._key)
        return (mask * x) * (1 / self._keep)


def _active_dropouts(block: nn.Module) -> list[tuple[object, str, nn.Dropout]]:
    """(parent, attribute or index, module) of every dropout that drops something."""
    found = []

    def visit(module):
        for name, child in list(module.items()):
            children = child if isinstance(child, (list, tuple)) else [child]
            for index, item in enumerate(children):
                if not isinstance(item, nn.Module):
                    continue
                slot = (child, index) if isinstance(child, list) else (module, name)
                if isinstance(item, nn.Dropout) and item.training and item._p_1 < 1:
                    found.append((*slot, item))
                else:
                    visit(item)

    visit(block)
    return found


def _put(parent, slot, module) -> None:
    if isinstance(parent, list):
        parent[slot] = module
    else:
        setattr(parent, slot, module)


def _checkpointed_subclass(cls: type) -> type:
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    base_call = cls.__call__

    def __call__(self, *args, **kwargs):
        dropouts = _active_dropouts(self)
        if not dropouts:
            def plain_block(params, *args, **kwargs):
                self.update(params)
                return base_call(self, *args, **kwargs)

            return mx.checkpoint(plain_block)(self.trainable_parameters(), *args, **kwargs)

        # One draw from the global state per call: a key for this block's masks.
        key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)

        def block(params, key, *args, **kwargs):
            self.update(params)
            # Random bits have no gradient; cut the key off the backward graph.
            keys = mx.random.split(mx.stop_gradient(key), max(len(dropouts), 2))
            for (parent, slot, dropout), k in zip(dropouts, keys, strict=False):
                _put(parent, slot, _KeyedDropout(dropout._p_1, k))
            try:
                return base_call(self, *args, **kwargs)
            finally:
                for parent, slot, dropout in dropouts:
                    _put(parent, slot, dropout)

        return mx.checkpoint(block)(self.trainable_parameters(), key, *args, **kwargs)

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

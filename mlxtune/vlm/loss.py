"""The VLM training loss: the text loss's contract on the VLM forward pass.

``VlmLoss`` has ``prepare(batch)`` and ``__call__(model, *arrays)`` like
``mlxtune.training.loss.MaskedLoss``, so the same Trainer (accumulation,
clipping, the non-finite guard, evaluation, resume) runs it. Logits are
computed only at supervised positions, in chunks, as on the text path;
image tokens and prompts never reach the head.

Frozen vision: when neither the vision tower nor the projector trains (the
default: adapters on the language model only), an image's features are the
same every epoch, so they are computed once per image per job and kept
(``feature_budget`` bytes at most), and each step runs only the language
model. With adapters on the vision side, features are recomputed in every
step so their gradients flow.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxtune.training.loss import MaskedLoss
from mlxtune.vlm.batch import VlmBatch
from mlxtune.vlm.data import PixelCache
from mlxtune.vlm.families import Tower, VlmFamily
from mlxtune.vlm.forward import image_features, language_hidden, merged_embeddings, output_head


def vision_trains(model: nn.Module, family: VlmFamily) -> bool:
    """Whether any parameter of the vision tower or projector is trainable."""
    return any(family.tower_of(name) in (Tower.VISION, Tower.PROJECTOR)
               for name, _ in tree_flatten(model.trainable_parameters()))


class VlmLoss:
    """(sum of token losses, supervised tokens) of a VlmBatch."""

    # mlx-vlm's vision towers turn grids into Python ints inside the forward
    # pass, which mx.compile cannot trace; the Trainer reads this flag.
    compilable = False

    def __init__(self, model: nn.Module, family: VlmFamily, pixels: PixelCache, *,
                 feature_budget: int = 1 << 30, chunk_size: int = 1024,
                 bucket_minimum: int = 64, upcast: bool | None = None) -> None:
        self.family = family
        self.pixels = pixels
        self.head = output_head(model)  # checks the head early; the call re-reads it
        self.chunk_size = chunk_size
        if upcast is None:
            upcast = mx.default_device().type == mx.DeviceType.cpu
        self.upcast = upcast
        # The text loss's row selection: supervised positions, bucketed.
        self._rows = MaskedLoss(head="lm_head", chunk_size=chunk_size,
                                bucket_minimum=bucket_minimum, upcast=upcast)
        self.cache_features = not vision_trains(model, family)
        self.feature_budget = feature_budget
        self.feature_bytes = 0
        self.features: dict[str, mx.array] = {}
        self._model = model
        self.feature_computations = 0  # images run through the vision tower (tests read it)

    def prepare(self, batch: VlmBatch) -> tuple:
        inputs, positions, targets, weights = self._rows.prepare(batch)
        rows = mx.array(batch.image_rows[:, :-1])
        mask = mx.array(batch.image_mask[:, :-1])
        mrope = mx.array(batch.positions[:, :, :-1]) if batch.positions is not None else None
        images = self._frozen_features(batch.image_keys) if self.cache_features else \
            [self.pixels.get(k) for k in batch.image_keys]
        return inputs, positions, targets, weights, rows, mask, mrope, images

    def _frozen_features(self, keys: list[str]) -> mx.array | None:
        if not keys:
            return None
        fresh: dict[str, mx.array] = {}
        missing = [k for k in dict.fromkeys(keys) if k not in self.features]
        if missing:
            inputs = [self.pixels.get(k) for k in missing]
            computed = mx.stop_gradient(image_features(self._model, self.family, inputs))
            mx.eval(computed)
            self.feature_computations += len(missing)
            offsets = np.cumsum([0] + [i.num_tokens for i in inputs]).tolist()
            for key, start, stop in zip(missing, offsets[:-1], offsets[1:], strict=True):
                fresh[key] = computed[start:stop]
                if self.feature_bytes + fresh[key].nbytes <= self.feature_budget:
                    self.features[key] = fresh[key]
                    self.feature_bytes += fresh[key].nbytes
        return mx.concatenate([self.features[k] if k in self.features else fresh[k]
                               for k in keys])

    def __call__(self, model: nn.Module, inputs, positions, targets, weights, image_rows,
                 image_mask, mrope, images) -> tuple[mx.array, mx.array]:
        if isinstance(images, list):  # trainable vision: features in the graph
            features = image_features(model, self.family, images) if images else None
        else:
            features = images
        embeds = merged_embeddings(model, inputs, features, image_rows, image_mask)
        hidden = language_hidden(model, self.family, inputs, embeds, mrope)
        hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
        head = output_head(model)
        total = mx.array(0.0, mx.float32)
        for start in range(0, positions.shape[0], self.chunk_size):
            stop = min(start + self.chunk_size, positions.shape[0])
            logits = head(hidden[start:stop])
            if self.upcast:
                logits = logits.astype(mx.float32)
            ce = nn.losses.cross_entropy(logits, targets[start:stop]) * weights[start:stop]
            total = total + ce.astype(mx.float32).sum()
        return total, weights.sum()


"""Padded VLM batches: a text Batch plus where each image's features go.

Examples are right-padded like text batches (``mlxtune.data.batching.collate``),
so causal attention keeps padding out of every real token's context and no
attention mask is needed. Image features of the batch are concatenated in the
order their tokens appear (example by example, image by image);
``image_rows[b, t]`` is the feature row for an image token, which lets one
``where`` put every image of every example in place at once — unlike
mlx-vlm's LLaVA merge, which handles one example per batch.

M-RoPE models get their per-example [3, T] position ids stacked to
[3, B, T]; padding continues each row's last position. They are passed to
the language model explicitly, because mlx-vlm's Qwen2-VL otherwise reuses
the position ids it cached from the previous call (and crashes, or worse,
when the next batch has another shape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlxtune.data.batch import Batch
from mlxtune.data.batching import collate
from mlxtune.vlm.data import VlmExample


@dataclass
class VlmBatch(Batch):
    image_keys: list[str] = field(default_factory=list)
    image_rows: np.ndarray | None = None  # int32 [B, T]: feature row of each image token
    image_mask: np.ndarray | None = None  # bool [B, T]: where image tokens are
    positions: np.ndarray | None = None  # int32 [3, B, T] for M-RoPE models

    @property
    def num_images(self) -> int:
        return len(self.image_keys)


def collate_vlm(examples: Sequence[VlmExample], image_token_id: int,
                pad_to_multiple_of: int = 8, pad_id: int = 0) -> VlmBatch:
    text = collate(examples, pad_to_multiple_of=pad_to_multiple_of, pad_id=pad_id)
    batch_size, width = text.tokens.shape
    image_mask = np.zeros((batch_size, width), dtype=bool)
    for i, example in enumerate(examples):
        image_mask[i, : len(example)] = example.tokens == image_token_id
    # Row-major order of image tokens = concatenation order of the features.
    image_rows = np.zeros((batch_size, width), dtype=np.int32)
    image_rows[image_mask] = np.arange(int(image_mask.sum()), dtype=np.int32)
    positions = None
    if any(e.positions is not None for e in examples):
        positions = np.zeros((3, batch_size, width), dtype=np.int32)
        for i, example in enumerate(examples):
            n = len(example)
            positions[:, i, :n] = example.positions
            tail = np.arange(1, width - n + 1, dtype=np.int32)
            positions[:, i, n:] = example.positions[:, n - 1:n] + tail
    return VlmBatch(tokens=text.tokens, loss_mask=text.loss_mask, lengths=text.lengths,
                    image_keys=[k for e in examples for k in e.image_keys],
                    image_rows=image_rows, image_mask=image_mask, positions=positions)

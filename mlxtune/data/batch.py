"""The unit the training loop consumes: a padded batch with its loss mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """A padded micro-batch.

    tokens[i, t] is token t of example i (padding after lengths[i]).
    loss_mask[i, t] is 1.0 where predicting tokens[i, t] from tokens[i, :t]
    counts in the loss (so column 0 is always 0), 0.0 elsewhere, padding
    included.
    """

    tokens: np.ndarray  # int32 [B, T]
    loss_mask: np.ndarray  # float32 [B, T]
    lengths: np.ndarray  # int32 [B]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.lengths.sum())

    @property
    def num_supervised(self) -> int:
        """Tokens the loss is computed on."""
        return int(self.loss_mask.sum())

"""Step time of the training loop: selective vs full logits, compiled vs eager.

    .venv/bin/python -m mlxtune.training.benchmark [--layers 4] [--vocab 49152]

A randomly initialised llama shaped like SmolLM2-135M (hidden 576, 9 heads,
3 KV heads, tied 49152-token head) with fewer layers, LoRA rank 8 on every
projection, float32 on OpenBLAS (mlxtune.blas). Batches are ragged like
real data and supervise the second half of each example (a completion).
Configurations alternate over rounds so all see the same background load;
each reports the median step after a warm-up step (compilation, including
the one-off C++ kernel build of MLX's CPU backend, is excluded and timed
separately).
"""

from __future__ import annotations

from mlxtune import blas

BLAS_INFO = blas.activate()  # before mlx.core loads

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import _get_classes  # noqa: E402

from mlxtune.data.batch import Batch  # noqa: E402
from mlxtune.testing.random_models import random_weights, tiny_config  # noqa: E402
from mlxtune.training.config import TrainingConfig  # noqa: E402
from mlxtune.training.loop import Trainer  # noqa: E402
from mlxtune.training.metrics import TrainingCallbacks  # noqa: E402


def make_batch(index: int, args) -> Batch:
    rng = np.random.default_rng(index)
    lengths = rng.integers(args.seq // 2, args.seq + 1, size=args.batch).astype(np.int32)
    tokens = np.zeros((args.batch, int(lengths.max())), np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, args.vocab, size=n)
        mask[i, int(n * (1 - args.supervised)):n] = 1.0
    mask[:, 0] = 0.0
    return Batch(tokens, mask, lengths)


def build(args, weights):
    config = tiny_config("llama", hidden_size=576, num_layers=args.layers,
                         intermediate_size=1536, num_heads=9, num_kv_heads=3,
                         vocab_size=args.vocab, tie_word_embeddings=True)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if not weights:
        weights.update(random_weights(config))
    model.load_weights(list(weights.items()))
    model.freeze()
    linear_to_lora_layers(model, args.layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


def run_config(args, weights, selective: bool, compiled: bool) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the others)."""
    times = []
    cfg = TrainingConfig(max_steps=args.steps + 1, compile=compiled, eval_every_steps=0,
                         save_every_steps=0, batch_size=args.batch)
    trainer = Trainer(build(args, weights), cfg, lambda i: make_batch(i, args),
                      batches_per_epoch=1000, selective_logits=selective,
                      callbacks=TrainingCallbacks(on_step=lambda m: times.append(m.step_seconds)))
    trainer.run()
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--supervised", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"BLAS: {BLAS_INFO}")
    weights: dict = {}
    configs = [(s, c) for c in (False, True) for s in (False, True)]
    results: dict = {k: [] for k in configs}
    first: dict = {}
    for _ in range(args.rounds):
        for key in configs:
            start = time.perf_counter()
            warm, median = run_config(args, weights, *key)
            first.setdefault(key, (warm, time.perf_counter() - start))
            results[key].append(median)
    for (selective, compiled), medians in results.items():
        name = f"{'selective' if selective else 'full':9s} {'compiled' if compiled else 'eager':8s}"
        print(f"{name} step {min(medians) * 1000:8.1f} ms (medians over rounds: "
              f"{', '.join(f'{m * 1000:.0f}' for m in medians)}); "
              f"first step {first[(selective, compiled)][0]:.1f} s")


if __name__ == "__main__":
    main()

"""MLX on the CPU: the bundled reference BLAS vs OpenBLAS (mlxtune.blas), side by side.

    .venv/bin/python bench/bench_blas.py [--rounds 2] [--steps 3]

The BLAS is chosen when libmlx.so loads, so every measurement runs in its own
interpreter (this file with --worker), with MLXTUNE_BLAS=bundled or =openblas
(and OpenBLAS once more pinned to one thread). Rounds alternate the
configurations so all see the same background load; each number is the best
over rounds, since on a shared machine noise only adds time.

Measured: float32 n×n×n matmul GFLOP/s, and the time of one LoRA training step
(forward, backward, Adam update) on a small randomly initialised llama in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Each configuration's environment on top of ours. "openblas" keeps the thread
# count OpenBLAS picks (or OPENBLAS_NUM_THREADS if set); "openblas-1t" pins one
# thread, which holds up far better when other processes share the cores.
CONFIGS = {
    "bundled": {"MLXTUNE_BLAS": "bundled"},
    "openblas": {"MLXTUNE_BLAS": "openblas"},
    "openblas-1t": {"MLXTUNE_BLAS": "openblas", "OPENBLAS_NUM_THREADS": "1"},
}
MATMUL_SIZES = (256, 512, 1024)

# Small enough that a step on the reference BLAS takes seconds, not minutes.
MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=2048)
BATCH, SEQ_LEN, LORA_RANK = 4, 64, 8


def lora_step_seconds(steps: int) -> float:
    """Best time of one LoRA train step (after a warm-up step)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes

    from mlxtune.testing.random_models import random_weights, tiny_config

    config = tiny_config("llama", **MODEL)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights(list(random_weights(config).items()))
    model.freeze()
    linear_to_lora_layers(
        model, MODEL["num_layers"], {"rank": LORA_RANK, "scale": 20.0, "dropout": 0.0}
    )

    tokens = mx.random.randint(0, MODEL["vocab_size"], (BATCH, SEQ_LEN + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-4, bias_correction=True)

    def step():
        loss, grads = loss_and_grad(model, inputs, targets)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)

    step()  # warm-up: optimizer state allocation, first-call costs
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def worker(steps: int) -> None:
    """Measure under whatever MLXTUNE_BLAS says; print one JSON line."""
    from mlxtune import blas

    info = blas.activate()  # before anything imports mlx.core
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    gflops = {}
    for n in MATMUL_SIZES:
        # The reference BLAS needs ~0.6 s for a 1024³ matmul: fewer repeats there.
        gflops[n] = blas.measure_gflops(n, repeats=3 if n >= 1024 else 10)
    print(
        json.dumps({"info": vars(info), "gflops": gflops, "lora_step_s": lora_step_seconds(steps)})
    )


def run_worker(config: str, steps: int) -> dict:
    env = dict(os.environ, **CONFIGS[config])
    result = subprocess.run(
        [sys.executable, __file__, "--worker", "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    return {
        "info": runs[0]["info"],
        "gflops": {n: max(r["gflops"][n] for r in runs) for n in runs[0]["gflops"]},
        "lora_step_s": min(r["lora_step_s"] for r in runs),
    }


def print_table(results: dict[str, dict], load_before: str) -> None:
    for config, result in results.items():
        info = result["info"]
        state = "active" if info["active"] else "inactive"
        print(
            f"{config:>12}: {info['name']} ({state}, {info['threads']} threads) - {info['reason']}"
        )
    if not results["openblas"]["info"]["active"]:
        print("WARNING: OpenBLAS did not activate; its columns measure the bundled BLAS.")
    print()

    fast_configs = [c for c in results if c != "bundled"]
    header = f"{'measurement':<30}{'bundled':>10}" + "".join(
        f"{c:>13}{'speed-up':>10}" for c in fast_configs
    )
    print(header)
    print("-" * len(header))
    slow = results["bundled"]
    for n in slow["gflops"]:
        row = f"{f'matmul f32 {n}³ (GFLOP/s)':<30}{slow['gflops'][n]:>10.1f}"
        for c in fast_configs:
            value = results[c]["gflops"][n]
            row += f"{value:>13.1f}{value / slow['gflops'][n]:>9.1f}×"
        print(row)
    row = f"{f'LoRA step, {BATCH}×{SEQ_LEN} tok (ms)':<30}{slow['lora_step_s'] * 1e3:>10.0f}"
    for c in fast_configs:
        value = results[c]["lora_step_s"]
        row += f"{value * 1e3:>13.0f}{slow['lora_step_s'] / value:>9.1f}×"
    print(row)
    print(
        f"\nLoRA model: llama, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, "
        f"vocab {MODEL['vocab_size']}, rank {LORA_RANK} on all layers, float32; best timed step."
        f"\nOPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
        f"load average at start: {load_before}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per BLAS")
    parser.add_argument("--steps", type=int, default=3, help="timed LoRA steps per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps)
        return

    # Other processes on the machine skew every number; say how busy it was.
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            runs[config].append(run_worker(config, args.steps))
    print_table({c: best_of(c_runs) for c, c_runs in runs.items()}, load_before)


if __name__ == "__main__":
    main()

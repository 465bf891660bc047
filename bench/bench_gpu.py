"""Training throughput of mlxtune's loop on whatever device MLX has (GPU or CPU).

A llama-shaped model (random weights, built in memory), LoRA on every
projection, synthetic batches with half of each sequence supervised, run
through ``mlxtune.training.loop.Trainer`` — the loop the job worker runs —
compiled and eager, with logits only at supervised positions and with full
logits (what mlx-lm's trainer computes). Prints one table.

    python bench/bench_gpu.py                  # ~1.2B model, batch 8 x 512
    python bench/bench_gpu.py --hidden 576 --layers 30 --vocab 49152   # SmolLM2-shaped
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxtune.adapters.apply import get_peft_model
from mlxtune.adapters.config import AdapterConfig
from mlxtune.data.batch import Batch
from mlxtune.training.config import TrainingConfig
from mlxtune.training.loop import Trainer
from mlxtune.training.metrics import TrainingCallbacks


def build_model(args, dtype):
    from mlx_lm.models import llama

    config = dict(model_type="llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                  intermediate_size=args.intermediate or args.hidden * 8 // 3 // 64 * 64,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  rms_norm_eps=1e-5, vocab_size=args.vocab, tie_word_embeddings=False)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def batch_source(args):
    rng = np.random.default_rng(0)

    # seq + 1 tokens: the model reads tokens[:, :-1], so its input length is
    # `seq` (a multiple of 32, as the data pipeline's collate makes it).
    width = args.seq + 1

    def batch_at(index: int) -> Batch:
        tokens = rng.integers(0, args.vocab, (args.batch, width), dtype=np.int32)
        mask = np.zeros((args.batch, width), np.float32)
        mask[:, width // 2:] = 1.0  # the second half supervised, as an answer after a prompt
        return Batch(tokens=tokens, loss_mask=mask,
                     lengths=np.full((args.batch,), width, np.int32))

    return batch_at


def run(args, *, compile: bool, selective: bool) -> dict:
    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float32
    model = build_model(args, dtype)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    config = AdapterConfig(rank=args.rank).with_defaults(args.layers)
    get_peft_model(model, config)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    times: list[float] = []
    callbacks = TrainingCallbacks(on_step=lambda m: times.append(m.step_seconds))
    cfg = TrainingConfig(max_steps=args.warmup + args.steps, batch_size=args.batch,
                         learning_rate=1e-4, eval_every_steps=0, save_every_steps=0,
                         compile=compile)
    mx.reset_peak_memory()
    trainer = Trainer(model, cfg, batch_source(args), batches_per_epoch=1000,
                      callbacks=callbacks, selective_logits=selective)
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started
    step = statistics.median(times[args.warmup:])
    tokens = args.batch * args.seq  # model positions per step
    # Forward + backward of the frozen base is ~ 6 x params x tokens minus the
    # weight gradients LoRA skips (2 x params x tokens): count 4 x params x tokens.
    flops = 4 * total * tokens / step
    return {"compile": compile, "selective": selective, "params": total, "trainable": trainable,
            "first_step_s": times[0], "step_s": step, "tokens_per_s": tokens / step,
            "tflops": flops / 1e12, "peak_gib": mx.get_peak_memory() / 2**30, "wall_s": wall}


def run_mlx_lm(args) -> dict:
    """The same model, LoRA and batches through mlx-lm's own trainer (one compiled
    step: gradients and the AdamW update in one graph, full logits, no clipping)."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train

    dtype = mx.bfloat16 if args.dtype == "bfloat16" else mx.float32
    model = build_model(args, dtype)
    get_peft_model(model, AdapterConfig(rank=args.rank).with_defaults(args.layers))
    rng = np.random.default_rng(0)
    # (tokens, offset): the loss starts at the offset, as our batches' second half.
    data = [(rng.integers(0, args.vocab, args.seq + 1).tolist(), (args.seq + 1) // 2)
            for _ in range(args.batch * 4)]
    reports: list[dict] = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    train(model, optim.AdamW(learning_rate=1e-4), data, args=TrainingArgs(
        batch_size=args.batch, iters=args.warmup + args.steps, steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=args.seq + 1,
        adapter_file="/tmp/mlx_lm_bench_adapters.safetensors"), training_callback=Record())
    # mlx-lm counts the tokens its loss covers (here the second half of each
    # sequence); scale to every real token, as ours counts.
    supervised = args.seq + 1 - (args.seq + 1) // 2
    speeds = [r["tokens_per_second"] * args.seq / supervised for r in reports[args.warmup:]]
    return statistics.median(speeds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compiled-only", action="store_true", help="skip the eager rows")
    p.add_argument("--mlx-lm", action="store_true",
                   help="also time mlx-lm's own trainer on the same model and batches")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak, to print MFU (H100 SXM: 989)")
    args = p.parse_args()
    print(f"MLX {mx.__version__} on {mx.default_device()}; {args.dtype}; batch {args.batch} x "
          f"{args.seq} positions; LoRA r={args.rank} on all linear layers", flush=True)
    rows = []
    modes = ((True, True), (True, False), (False, True), (False, False))
    for compile_, selective in modes[:2] if args.compiled_only else modes:
        rows.append(run(args, compile=compile_, selective=selective))
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    mlx_lm_speed = run_mlx_lm(args) if args.mlx_lm else None
    print(f"\nmodel: {rows[0]['params'] / 1e9:.2f}B parameters, {rows[0]['trainable'] / 1e6:.1f}M "
          "trainable\n")
    print("| step | logits | tokens/s | vs first | s/step | first step s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['tflops'] / args.peak_tflops:.1f}%" if args.peak_tflops else "-"
        print(f"| {'compiled' if r['compile'] else 'eager'} | "
              f"{'supervised only' if r['selective'] else 'all positions'} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['step_s']:.3f} | "
              f"{r['first_step_s']:.1f} | {r['tflops']:.0f} | {mfu} | {r['peak_gib']:.1f} |")
    if mlx_lm_speed is not None:
        print(f"| mlx-lm trainer (compiled) | all positions | {mlx_lm_speed:,.0f} | "
              f"{mlx_lm_speed / base:.2f}x | | | | | |")


if __name__ == "__main__":
    main()

"""VLM training throughput: tokens/s and images/s of a short run per family and mode.

    .venv/bin/python bench/bench_vlm.py [--steps 12] [--warmup 2] [--size tiny|small]

The tiny random VLMs of mlxtune.testing.random_vlms (``--size small``: hidden
256, 4 language and 4 vision blocks), the real sample photos and caption task
of the tests, batch 4, LoRA rank 16, float32 + OpenBLAS, the real Trainer and
VlmLoss in a fresh process per measurement. Modes:

  language   adapters on the language model; frozen image features computed
             once per image and cached (the default)
  recompute  the same, with the cache off: the vision tower runs in every step,
             as a trainer that calls the model's own forward pass does
  towers     adapters on language, vision and projector: the vision tower
             trains, so it runs (and back-propagates) in every step

tokens/s counts every sequence position (text and image tokens), images/s the
images in the step's batches; both are medians over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _common

FAMILIES = ("qwen2_vl", "llava")
MODES = ("language", "recompute", "towers")
SIZES = {"tiny": {}, "small": {"hidden_size": 256, "num_layers": 4, "vision_layers": 4}}


def worker(family: str, mode: str, size: str, steps: int, warmup: int) -> dict:
    from mlxtune.blas import activate

    blas = activate()  # before MLX loads
    import hashlib

    from mlxtune.adapters.config import AdapterConfig
    from mlxtune.data.batching import BatchPlan
    from mlxtune.testing.random_vlms import write_vlm
    from mlxtune.testing.sample_images import caption_records, sample_photos
    from mlxtune.training.config import TrainingConfig
    from mlxtune.training.loop import Trainer
    from mlxtune.vlm.batch import collate_vlm
    from mlxtune.vlm.data import PixelCache, VlmProcessing, build_vlm_examples
    from mlxtune.vlm.families import Tower, vlm_family
    from mlxtune.vlm.loss import VlmLoss
    from mlxtune.vlm.models import get_vlm_peft_model, load_vlm

    folder = _common.SCRATCH / "vlms" / f"{size}-{family}"
    if not (folder / "model.safetensors").exists():
        write_vlm(folder, family, seed=1, **SIZES[size])
    images = _common.SCRATCH / "vlms" / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in sample_photos().items():
        path = images / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        files[f"photos/{name}"] = path
    model, processor, config = load_vlm(folder, "float32")
    family_spec = vlm_family(config)
    processing = VlmProcessing(processor, family_spec, config, model)
    cache = PixelCache(lambda key: processing.image_inputs(images / key))
    data = build_vlm_examples(caption_records(), files, processing, cache, max_seq_length=512)
    towers = (Tower.LANGUAGE, Tower.VISION, Tower.PROJECTOR) if mode == "towers" \
        else (Tower.LANGUAGE,)
    get_vlm_peft_model(model, family_spec, AdapterConfig(rank=16).with_defaults(
        len(model.layers)), towers)
    loss = VlmLoss(model, family_spec, cache)
    if mode == "recompute":
        loss.cache_features = False
    examples = data.examples
    plan = BatchPlan([len(e) for e in examples], 4, seed=0)
    batches = {}

    def batch_at(index):
        batches[index] = collate_vlm([examples[j] for j in plan.batch_indices(index)],
                                     processing.image_token_id)
        return batches[index]

    metrics = []
    trainer = Trainer(model, TrainingConfig.from_dict(
        {"max_steps": steps, "batch_size": 4, "learning_rate": 5e-3, "eval_every_steps": 0}),
        batch_at, batches_per_epoch=plan.batches_per_epoch, loss=loss)
    trainer.callbacks.on_step = metrics.append
    started = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - started
    measured = metrics[warmup:]
    per_step_images = [batches[m.step - 1].num_images for m in measured]
    return {
        "family": family, "mode": mode, "blas": blas.name,
        "tokens_per_second": _common.median(m.tokens_per_second for m in measured),
        "images_per_second": _common.median(n / m.step_seconds
                                            for n, m in zip(per_step_images, measured,
                                                            strict=True)),
        "step_ms": _common.median(m.step_seconds * 1000 for m in measured),
        "loss_first": metrics[0].loss, "loss_last": metrics[-1].loss, "wall_s": wall,
        "vision_runs": loss.feature_computations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--mode", choices=MODES)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.family, args.mode, args.size, args.steps, args.warmup)))
        return
    machine = _common.Machine()
    rows = []
    for family in FAMILIES:
        for mode in MODES:
            r = _common.run_worker(__file__, ["--family", family, "--mode", mode,
                                              "--size", args.size, "--steps", str(args.steps),
                                              "--warmup", str(args.warmup)], timeout=1800)
            rows.append([family, mode, f"{r['tokens_per_second']:.0f}",
                         f"{r['images_per_second']:.1f}", f"{r['step_ms']:.0f}",
                         f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}", r["blas"]])
            print(rows[-1], file=sys.stderr)
    print(machine.header(f"VLM training throughput ({args.size} models, batch 4, "
                         f"{args.steps} steps, median after {args.warmup})"))
    print()
    print(_common.markdown_table(
        ["family", "mode", "tokens/s", "images/s", "step ms", "loss", "BLAS"], rows,
        right={2, 3, 4}))
    print()
    print(machine.footer())


if __name__ == "__main__":
    main()

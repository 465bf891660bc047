"""The mlxtune CLI's subcommands: models, checkpoints, datasets and training jobs."""

from __future__ import annotations

import argparse
import json
import os

from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client import output
from mlxtune_client.cli import EXIT_OK, Context, arg, command, follow
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.messages import enum_choices, parse_cli_value

# -- models and checkpoints --------------------------------------------------------


@command("inspect", "describe a model without loading its weights", arg("model"))
def inspect_model(ctx: Context) -> None:
    ctx.out.result(ctx.client.inspect(ctx.args.model), output.model_report)


@command("prepare", "apply an adapter config to a model and store the initial checkpoint",
         arg("model"),
         arg("--method", default="lora", choices=["lora", "dora", "full"]),
         arg("--rank", "-r", type=int), arg("--alpha", type=float),
         arg("--dropout", type=float),
         arg("--target-modules", metavar="A,B", help='comma-separated, or "all-linear"'),
         arg("--num-layers", type=int, help="adapt only the last N transformer blocks"),
         arg("--seed", type=int), arg("--rslora", action="store_true"),
         arg("--request-id"))
def prepare(ctx: Context) -> None:
    a = ctx.args
    response = ctx.client.prepare(
        a.model, method=a.method, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
        target_modules=a.target_modules.split(",") if a.target_modules else None,
        num_layers=a.num_layers, seed=a.seed, use_rslora=a.rslora, request_id=a.request_id)
    if response.already_existed:
        ctx.out.note("an identical checkpoint already existed")
    ctx.out.result(response.checkpoint, output.checkpoint)


@command("checkpoints list", "list checkpoints, newest first",
         arg("--parent", default="", help="only checkpoints trained from this one"))
def checkpoints_list(ctx: Context) -> None:
    ctx.out.results(ctx.client.list_checkpoints(parent=ctx.args.parent),
                    output.checkpoint_table, "no checkpoints")


@command("checkpoints get", "show one checkpoint", arg("name"))
def checkpoints_get(ctx: Context) -> None:
    ctx.out.result(ctx.client.get_checkpoint(ctx.args.name), output.checkpoint)


@command("checkpoints delete", "delete a checkpoint and its files", arg("name"))
def checkpoints_delete(ctx: Context) -> None:
    ctx.client.delete_checkpoint(ctx.args.name)
    if ctx.out.json_mode:
        ctx.out.json_line({"deleted": ctx.args.name})
    else:
        ctx.out.console.print(f"deleted {ctx.args.name}", markup=False)


# -- datasets ------------------------------------------------------------------------

_FORMATS = enum_choices(trainer_pb.DatasetFormat.DESCRIPTOR)


@command("upload", "upload a JSONL dataset", arg("file"),
         arg("--format", choices=_FORMATS, help="default: detected from the first record"),
         arg("--name", dest="display_name", help="display name (default: the file name)"),
         arg("--images", metavar="DIR",
             help="folder the records' image paths are relative to (vision-language chats)"),
         arg("--request-id"))
def upload(ctx: Context) -> None:
    a = ctx.args
    ds = ctx.client.upload_dataset(a.file, format=a.format, display_name=a.display_name,
                                   request_id=a.request_id, images=a.images)
    ctx.out.result(ds, output.dataset)


@command("datasets list", "list datasets, newest first")
def datasets_list(ctx: Context) -> None:
    ctx.out.results(ctx.client.list_datasets(), output.dataset_table, "no datasets")


@command("datasets get", "show one dataset", arg("name"))
def datasets_get(ctx: Context) -> None:
    ctx.out.result(ctx.client.get_dataset(ctx.args.name), output.dataset)


# -- training ------------------------------------------------------------------------


def _config(a: argparse.Namespace) -> dict:
    config: dict = {}
    if a.config:
        try:
            with open(a.config) as file:
                loaded = json.load(file)
        except (OSError, ValueError) as error:
            raise MlxtuneClientError.invalid_argument(f"--config {a.config}: {error}") from None
        if not isinstance(loaded, dict):
            raise MlxtuneClientError.invalid_argument(
                f"--config {a.config}: expected a JSON object of TrainingConfig fields")
        config.update(loaded)
    shortcuts = {"max_steps": a.steps, "epochs": a.epochs, "batch_size": a.batch_size,
                 "learning_rate": a.lr, "max_seq_length": a.max_seq_length,
                 "eval_every_steps": a.eval_every}
    config.update({k: v for k, v in shortcuts.items() if v is not None})
    for item in a.set or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise MlxtuneClientError.invalid_argument(f"--set {item!r}: expected KEY=VALUE")
        config[key.strip()] = parse_cli_value(value)
    return config


def _dataset(ctx: Context, value: str) -> str:
    """A dataset name, or a local JSONL file uploaded on the spot."""
    if value and not value.startswith("datasets/") and os.path.isfile(value):
        ds = ctx.client.upload_dataset(value)
        ctx.out.note(f"uploaded {value} as {ds.name} ({ds.num_records} records)")
        return ds.name
    return value


@command("train", "create a training job and follow it until it ends",
         arg("checkpoint", help="checkpoints/{id} to train"),
         arg("dataset", help="datasets/{id}, or a local JSONL file to upload first"),
         arg("--validation-dataset", default="", help="datasets/{id} or a local JSONL file"),
         arg("--max-steps", "--steps", dest="steps", type=int), arg("--epochs", type=float),
         arg("--batch-size", type=int),
         arg("--learning-rate", "--lr", dest="lr", type=float),
         arg("--max-seq-length", type=int),
         arg("--eval-every-steps", "--eval-every", dest="eval_every", type=int),
         arg("--config", metavar="FILE.json", help="TrainingConfig fields as a JSON object"),
         arg("--set", action="append", metavar="KEY=VALUE",
             help="any TrainingConfig field, e.g. --set lr_schedule=linear (repeatable)"),
         arg("--display-name", default=""), arg("--request-id"),
         arg("--detach", action="store_true", help="create the job and return at once"))
def train(ctx: Context) -> int:
    a = ctx.args
    job = ctx.client.create_job(
        a.checkpoint, _dataset(ctx, a.dataset),
        validation_dataset=_dataset(ctx, a.validation_dataset), config=_config(a),
        display_name=a.display_name, request_id=a.request_id)
    if a.detach:
        ctx.out.result(job, output.job)
        return EXIT_OK
    ctx.out.note(f"created {job.name}")
    stream = ctx.client.watch(job.name)
    stream.training_job = job
    return follow(ctx, stream)


@command("watch", "follow a job's events (resumes after dropped connections)", arg("job"),
         arg("--after", type=int, default=0, help="only events after this sequence number"))
def watch(ctx: Context) -> int:
    return follow(ctx, ctx.client.watch(ctx.args.job, ctx.args.after))


@command("jobs list", "list training jobs, newest first",
         arg("--state", action="append", dest="states",
             choices=enum_choices(trainer_pb.JobState.DESCRIPTOR),
             help="only jobs in this state (repeatable)"))
def jobs_list(ctx: Context) -> None:
    ctx.out.results(ctx.client.list_jobs(states=ctx.args.states), output.job_table, "no jobs")


@command("jobs get", "show one job", arg("job"))
def jobs_get(ctx: Context) -> None:
    ctx.out.result(ctx.client.get_job(ctx.args.job), output.job)


@command("jobs cancel", "cancel a queued or running job", arg("job"))
def jobs_cancel(ctx: Context) -> None:
    ctx.out.result(ctx.client.cancel_job(ctx.args.job), output.job)


@command("jobs resume", "resume an interrupted, failed or cancelled job", arg("job"),
         arg("--watch", action="store_true", help="follow it until it ends"))
def jobs_resume(ctx: Context) -> int:
    job = ctx.client.resume_job(ctx.args.job)
    if not ctx.args.watch:
        ctx.out.result(job, output.job)
        return EXIT_OK
    # Follow from the resume on: the history before it was already shown once.
    return follow(ctx, ctx.client.watch(job.name, max(0, job.last_sequence - 1)))

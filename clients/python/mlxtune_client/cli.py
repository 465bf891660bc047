"""``mlxtune``: the command line over :class:`MlxtuneClient`.

Every subcommand is one function registered with :func:`command`, in
``mlxtune_client.commands`` or in another module named in
:data:`COMMAND_MODULES`. Adding one (``export``, ``generate``...) means
writing that function and nothing else:

    @command("export", "write a checkpoint's adapter in another format",
             arg("checkpoint"), arg("--format", default="peft"))
    def export(ctx: Context) -> int | None:
        ...  # ctx.args, ctx.client, ctx.out; return an exit code or None for 0

Exit codes: 0 success; 1 the job failed, was cancelled or interrupted;
2 a usage error or a failed call (its message and field violations printed);
130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client import output
from mlxtune_client.client import DEFAULT_PEFT_ADDRESS, DEFAULT_TRAINER_ADDRESS, MlxtuneClient
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.output import Output
from mlxtune_client.progress import TrainingView
from mlxtune_client.watch import EventStream

EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("jobs", "list")
    run: Callable[[Context], int | None]
    help: str
    args: tuple[tuple[tuple, dict], ...]


COMMANDS: list[Command] = []
# Modules whose import registers subcommands, in the order --help lists them.
COMMAND_MODULES = ("mlxtune_client.commands", "mlxtune_client.commands_adapters")


def arg(*flags: str, **options: Any) -> tuple[tuple, dict]:
    """One argument of a subcommand, as ``argparse.add_argument`` takes it."""
    return flags, options


def command(path: str, help: str, *args: tuple[tuple, dict]):
    """Register a subcommand; ``path`` is "name" or "group name" (e.g. "jobs list")."""
    def register(run: Callable[[Context], int | None]):
        COMMANDS.append(Command(tuple(path.split()), run, help, args))
        return run
    return register


class Context:
    """What a subcommand works with: its arguments, the client and the output."""

    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self.args = args
        self.out = out

    @cached_property
    def client(self) -> MlxtuneClient:
        return MlxtuneClient(self.args.peft, self.args.trainer, timeout=self.args.timeout)

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)  # registers its commands (once: imports are cached)
    parser = argparse.ArgumentParser(
        prog="mlxtune", description="Fine-tune models with mlxtune's PEFT and trainer services.")
    parser.add_argument("--peft", metavar="HOST:PORT",
                        default=os.environ.get("MLXTUNE_PEFT_ADDRESS", DEFAULT_PEFT_ADDRESS),
                        help="PEFT service address [MLXTUNE_PEFT_ADDRESS] (default: %(default)s)")
    parser.add_argument("--trainer", metavar="HOST:PORT",
                        default=os.environ.get("MLXTUNE_TRAINER_ADDRESS",
                                               DEFAULT_TRAINER_ADDRESS),
                        help="trainer service address [MLXTUNE_TRAINER_ADDRESS] "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output: one JSON object per result, one JSON "
                             "line per event when streaming")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of each call in seconds (default: %(default)s)")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.path)):  # "jobs" before "jobs list"
            group = cmd.path[:depth]
            if group not in groups:
                sub = groups[group[:-1]].add_parser(group[-1], help=f"{group[-1]} commands")
                groups[group] = sub.add_subparsers(dest="_".join(group), metavar="COMMAND",
                                                   required=True)
        sub = groups[cmd.path[:-1]].add_parser(cmd.path[-1], help=cmd.help,
                                               description=cmd.help)
        for flags, options in cmd.args:
            sub.add_argument(*flags, **options)
        # Also accepted after the subcommand; SUPPRESS keeps the global value otherwise.
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="machine-readable output")
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors exit 2, --help 0: return, not exit
        return int(exit_.code or 0)
    ctx = Context(args, Output(args.json))
    try:
        return args.run(ctx) or EXIT_OK
    except MlxtuneClientError as error:
        ctx.out.error(error)
        return EXIT_ERROR
    except KeyboardInterrupt:
        ctx.out.note("interrupted")
        return EXIT_INTERRUPTED
    finally:
        ctx.close()


# -- streaming -------------------------------------------------------------------


def follow(ctx: Context, stream: EventStream) -> int:
    """Print a job's events until it ends; the exit code says how it ended."""
    try:
        if ctx.out.json_mode:
            for event in stream:
                ctx.out.json_line(event)
        else:
            job = stream.training_job or ctx.client.get_job(stream.job)
            with TrainingView(ctx.out.console, job=job) as view:
                for event in stream:
                    view.update(event)
    except KeyboardInterrupt:
        stream.close()
        # Ctrl-C detaches, it does not cancel: the job runs on the server.
        ctx.out.note(f"stopped watching; {stream.job} goes on.\n"
                     f"  follow it again: mlxtune watch {stream.job} --after "
                     f"{stream.last_sequence}\n  cancel it:       mlxtune jobs cancel {stream.job}")
        return EXIT_INTERRUPTED
    if not ctx.out.json_mode:
        job = ctx.client.get_job(stream.job)
        summary = f"{job.name} {output.job_state(job.state)} at step {job.step}/{job.total_steps}"
        if job.output_checkpoint:
            summary += f"; trained checkpoint: {job.output_checkpoint}"
        ctx.out.console.print(summary, markup=False)
    return EXIT_OK if stream.final_state == trainer_pb.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


if __name__ == "__main__":
    # Run as -m, this file is __main__; the commands register with the
    # importable mlxtune_client.cli, so call that module's main.
    from mlxtune_client.cli import main as cli_main

    sys.exit(cli_main())

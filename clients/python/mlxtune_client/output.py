"""How the CLI prints results: JSON lines for programs, rich text for people.

``--json`` prints each result as one JSON object on its own line, in the
proto3 JSON mapping with the .proto field names (int64 values are strings,
as that mapping says); lists print one object per item. Without it, results
are laid out for a terminal with ``rich``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from mlxtune.common.v1 import checkpoint_pb2 as common_pb
from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.messages import enum_short_name, to_dict


class Output:
    """Where a command's results go; ``json_mode`` picks the form."""

    def __init__(self, json_mode: bool, stdout=None, stderr=None) -> None:
        self.json_mode = json_mode
        self.stdout = stdout or sys.stdout
        self.console = Console(file=self.stdout, highlight=False)
        if not self.console.is_terminal:
            # Piped or captured: never cut names and digests to fit 80 columns.
            self.console.width = 1000
        self.err_console = Console(file=stderr or sys.stderr, highlight=False)
        if not self.err_console.is_terminal:
            self.err_console.width = 1000

    def json_line(self, value: Message | dict) -> None:
        data = to_dict(value) if isinstance(value, Message) else value
        self.stdout.write(json.dumps(data, sort_keys=False) + "\n")
        self.stdout.flush()

    def result(self, message: Message, human: Callable[[Console, Message], None]) -> None:
        if self.json_mode:
            self.json_line(message)
        else:
            human(self.console, message)

    def results(self, messages: Iterable[Message], table: Callable[[list], Table],
                empty: str) -> None:
        if self.json_mode:
            for message in messages:  # stream: pages arrive as the iteration goes
                self.json_line(message)
            return
        items = list(messages)
        self.console.print(table(items) if items else empty)

    def note(self, text: str) -> None:
        """Progress remarks for people; never mixed into JSON output."""
        if not self.json_mode:
            self.err_console.print(text)

    def error(self, error: MlxtuneClientError) -> None:
        if self.json_mode:
            print(json.dumps({"error": error.to_dict()}), file=self.err_console.file)
            return
        self.err_console.print(f"[bold red]error:[/] {error.code.name}: {error.message}"
                               + (f" [dim]({error.reason})[/]"
                                  if error.reason not in ("", error.code.name) else ""),
                               markup=True)
        for violation in error.violations:
            if f"{violation.field}: {violation.description}" not in error.message:
                self.err_console.print(f"  {violation.field}: {violation.description}",
                                       markup=False)


# -- human layouts -------------------------------------------------------------


def fields(console: Console, rows: list[tuple[str, object]]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        if value not in (None, ""):
            table.add_row(key, str(value))
    console.print(table)


def _table(*columns: str) -> Table:
    """A table of one line per row; other columns shrink before the first."""
    table = Table()
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    return table


def _names_whole(table: Table, items: list) -> Table:
    # The first column holds resource names, which people copy: never cut them.
    table.columns[0].min_width = max((len(item.name) for item in items), default=4)
    return table


def when(stamp) -> str:
    if not stamp.seconds:
        return ""
    return datetime.fromtimestamp(stamp.seconds, timezone.utc).astimezone().strftime(
        "%Y-%m-%d %H:%M:%S")


def loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def model_report(console: Console, report) -> None:
    base = report.base_model
    quant = report.quantization
    quantized = f"{quant.bits}-bit, group {quant.group_size} ({quant.mode})" if quant.bits else ""
    if quant.gguf_types:
        quantized += (" " if quantized else "") + "GGUF " + ", ".join(
            f"{k}×{v}" for k, v in sorted(quant.gguf_types.items()))
    fields(console, [
        ("model", base.model), ("path", base.resolved_path),
        ("format", enum_short_name(common_pb.ModelFormat.DESCRIPTOR, base.format)),
        ("architecture", base.architecture), ("layers", report.num_layers),
        ("hidden size", report.hidden_size), ("vocabulary", report.vocab_size),
        ("dtype", report.dtype), ("quantization", quantized),
        ("parameters", f"{report.total_parameters:,}"),
        ("weights on disk", _size(report.weight_bytes)),
        ("chat template", "yes" if report.has_chat_template else "no"),
        ("digest", base.digest)])
    table = Table(title="modules LoRA can target", title_justify="left")
    for column in ("name", "type", "count", "in", "out"):
        table.add_column(column, justify="left" if column in ("name", "type") else "right")
    for module in report.targetable_modules:
        table.add_row(module.name, module.layer_type, str(module.count),
                      str(module.in_features), str(module.out_features))
    console.print(table)


def checkpoint(console: Console, ckpt: common_pb.Checkpoint) -> None:
    config = ckpt.adapter_config
    adapter = (f"{enum_short_name(common_pb.AdapterMethod.DESCRIPTOR, config.method)} "
               f"r={config.rank} alpha={config.alpha:g} dropout={config.dropout:g} "
               f"targets={','.join(config.target_modules)}"
               + (f" num_layers={config.num_layers}" if config.HasField("num_layers") else ""))
    fields(console, [
        ("name", ckpt.name), ("model", ckpt.base_model.model),
        ("origin", enum_short_name(common_pb.CheckpointOrigin.DESCRIPTOR, ckpt.origin)),
        ("adapter", adapter), ("parent", ckpt.parent), ("job", ckpt.job),
        ("step", ckpt.step or ""),
        ("train loss", loss(ckpt.train_loss) if ckpt.HasField("train_loss") else ""),
        ("eval loss", loss(ckpt.eval_loss) if ckpt.HasField("eval_loss") else ""),
        ("created", when(ckpt.create_time)), ("path", ckpt.path),
        ("size", _size(ckpt.size_bytes))])
    if ckpt.parameters.summary:
        console.print(ckpt.parameters.summary)


def checkpoint_table(items: list[common_pb.Checkpoint]) -> Table:
    table = _table("name", "model", "origin", "adapter", "step", "eval loss", "created")
    for ckpt in items:
        config = ckpt.adapter_config
        table.add_row(
            ckpt.name, ckpt.base_model.model,
            enum_short_name(common_pb.CheckpointOrigin.DESCRIPTOR, ckpt.origin),
            f"{enum_short_name(common_pb.AdapterMethod.DESCRIPTOR, config.method)} "
            f"r={config.rank}",
            str(ckpt.step or ""), loss(ckpt.eval_loss) if ckpt.HasField("eval_loss") else "",
            when(ckpt.create_time))
    return _names_whole(table, items)


def dataset(console: Console, ds: trainer_pb.Dataset) -> None:
    fields(console, [
        ("name", ds.name), ("display name", ds.display_name),
        ("format", enum_short_name(trainer_pb.DatasetFormat.DESCRIPTOR, ds.format)),
        ("records", ds.num_records), ("size", _size(ds.size_bytes)), ("digest", ds.digest),
        ("source", ds.source), ("created", when(ds.create_time))])


def dataset_table(items: list[trainer_pb.Dataset]) -> Table:
    table = _table("name", "display name", "format", "records", "size", "created")
    for ds in items:
        table.add_row(ds.name, ds.display_name,
                      enum_short_name(trainer_pb.DatasetFormat.DESCRIPTOR, ds.format),
                      str(ds.num_records), _size(ds.size_bytes), when(ds.create_time))
    return _names_whole(table, items)


def job_state(state: int) -> str:
    return enum_short_name(trainer_pb.JobState.DESCRIPTOR, state)


def job(console: Console, j: trainer_pb.TrainingJob) -> None:
    config = j.config
    fields(console, [
        ("name", j.name), ("display name", j.display_name),
        ("state", job_state(j.state) + (f" (queue position {j.queue_position})"
                                        if j.queue_position else "")),
        ("checkpoint", j.checkpoint), ("dataset", j.dataset),
        ("validation dataset", j.validation_dataset),
        ("step", f"{j.step}/{j.total_steps or '?'}"),
        ("loss", loss(j.loss) if j.HasField("loss") else ""),
        ("eval loss", loss(j.eval_loss) if j.HasField("eval_loss") else ""),
        ("config", f"lr {config.learning_rate:g}, batch {config.batch_size}, "
                   f"max_seq_length {config.max_seq_length}"),
        ("output checkpoint", j.output_checkpoint),
        ("error", f"{j.error.reason}: {j.error.message}" if j.error.reason else ""),
        ("device", f"{j.device} ({j.blas})" if j.device else ""),
        ("created", when(j.create_time)), ("started", when(j.start_time)),
        ("ended", when(j.end_time))])


def job_table(items: list[trainer_pb.TrainingJob]) -> Table:
    table = _table("name", "state", "step", "loss", "eval loss", "output checkpoint",
                   "created")
    for j in items:
        table.add_row(j.name, job_state(j.state), f"{j.step}/{j.total_steps or '?'}",
                      loss(j.loss) if j.HasField("loss") else "",
                      loss(j.eval_loss) if j.HasField("eval_loss") else "",
                      j.output_checkpoint, when(j.create_time))
    return _names_whole(table, items)


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""

"""Conversions between the trainer core's plain objects and protobuf messages."""

from __future__ import annotations

import math
import time

from mlxtune.data.dataset_store import DatasetRecord
from mlxtune.data.formats import DatasetFormat
from mlxtune.jobs.db import EventRecord, JobRecord
from mlxtune.trainer.v1 import trainer_service_pb2 as pb
from mlxtune.training.config import ENUM_FIELDS, TrainingConfig
from services.peft_service.convert import timestamp
from services.trainer_service.core import Heartbeat

_FORMAT_TO_PB = {
    DatasetFormat.TEXT: pb.DATASET_FORMAT_TEXT,
    DatasetFormat.COMPLETIONS: pb.DATASET_FORMAT_COMPLETIONS,
    DatasetFormat.CHAT: pb.DATASET_FORMAT_CHAT,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}

_STATE_TO_PB = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "succeeded": pb.JOB_STATE_SUCCEEDED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
    "interrupted": pb.JOB_STATE_INTERRUPTED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

# Proto enum type of each enum field of TrainingConfig.
_ENUM_TYPES = {
    "optimizer": pb.Optimizer,
    "lr_schedule": pb.LrSchedule,
    "non_finite_policy": pb.NonFinitePolicy,
    "loss_mask": pb.LossMask,
    "compute_dtype": pb.ComputeDtype,
}


def dataset_format_from_pb(value: int) -> DatasetFormat | None:
    if value == pb.DATASET_FORMAT_UNSPECIFIED:
        return None
    if value not in _FORMAT_FROM_PB:
        from mlxtune.errors import InvalidArgument

        raise InvalidArgument.field("format", f"unknown dataset format {value}")
    return _FORMAT_FROM_PB[value]


def states_from_pb(values) -> tuple[str, ...]:
    from mlxtune.errors import InvalidArgument

    out = []
    for i, v in enumerate(values):
        if v not in _STATE_FROM_PB:
            raise InvalidArgument.field(f"states[{i}]", f"unknown job state {v}")
        out.append(_STATE_FROM_PB[v])
    return tuple(out)


def dataset_to_pb(record: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        name=record.name, format=_FORMAT_TO_PB.get(DatasetFormat(record.format), 0),
        num_records=record.num_records, size_bytes=record.size_bytes, digest=record.digest,
        create_time=timestamp(record.create_time), display_name=record.display_name,
        source=record.source, num_images=record.num_images)


def training_config_from_pb(msg: pb.TrainingConfig) -> TrainingConfig:
    """Set fields only; enum values travel by name ("OPTIMIZER_ADAMW")."""
    kwargs = {}
    for field in msg.DESCRIPTOR.fields:
        name = field.name
        if name in ENUM_FIELDS:
            value = getattr(msg, name)
            if value:
                kwargs[name] = _enum_name(name, value)
        elif field.has_presence:
            if msg.HasField(name):
                kwargs[name] = getattr(msg, name)
        elif getattr(msg, name):
            kwargs[name] = getattr(msg, name)
    return TrainingConfig(**kwargs)


def _enum_name(field: str, value: int) -> str:
    try:
        return _ENUM_TYPES[field].Name(value)
    except ValueError:
        from mlxtune.errors import InvalidArgument

        raise InvalidArgument.field(f"config.{field}", f"unknown value {value}") from None


def training_config_to_pb(config: dict) -> pb.TrainingConfig:
    c = TrainingConfig.from_dict(config)
    msg = pb.TrainingConfig()
    for field in msg.DESCRIPTOR.fields:
        value = getattr(c, field.name, None)
        if value is None:
            continue
        if field.name in ENUM_FIELDS:
            prefix = _ENUM_TYPES[field.name].DESCRIPTOR.values[0].name.rsplit("_", 1)[0]
            setattr(msg, field.name, _ENUM_TYPES[field.name].Value(
                f"{prefix}_{value.value.upper()}"))
        else:
            setattr(msg, field.name, value)
    return msg


def job_to_pb(job: JobRecord, queue_position: int = 0) -> pb.TrainingJob:
    msg = pb.TrainingJob(
        name=job.name, display_name=job.display_name,
        checkpoint=f"checkpoints/{job.checkpoint}", dataset=f"datasets/{job.dataset}",
        validation_dataset=f"datasets/{job.validation_dataset}" if job.validation_dataset else "",
        config=training_config_to_pb(job.config), state=_STATE_TO_PB[job.state],
        queue_position=queue_position, step=job.step, total_steps=job.total_steps,
        output_checkpoint=f"checkpoints/{job.output_checkpoint}" if job.output_checkpoint else "",
        checkpoints=[f"checkpoints/{c}" for c in job.checkpoints],
        create_time=timestamp(job.create_time), last_sequence=job.last_sequence,
        blas=job.blas, device=job.device, skipped_steps=job.skipped_steps,
        truncated_examples=job.truncated_examples)
    if job.loss is not None and not math.isnan(job.loss):
        msg.loss = job.loss
    if job.eval_loss is not None and not math.isnan(job.eval_loss):
        msg.eval_loss = job.eval_loss
    if job.error_reason:
        msg.error.CopyFrom(pb.JobError(reason=job.error_reason, message=job.error_message))
    if job.start_time:
        msg.start_time.CopyFrom(timestamp(job.start_time))
    if job.end_time:
        msg.end_time.CopyFrom(timestamp(job.end_time))
    return msg


def event_to_pb(item: EventRecord | Heartbeat, job_name: str) -> pb.JobEvent:
    if isinstance(item, Heartbeat):
        job = item.job
        return pb.JobEvent(
            sequence=job.last_sequence, job=job_name,
            heartbeat=pb.Heartbeat(state=_STATE_TO_PB[job.state], step=job.step,
                                   queue_position=item.queue_position),
            time=timestamp(time.time()))
    event = pb.JobEvent(sequence=item.sequence, time=timestamp(item.time), job=job_name)
    p = dict(item.payload)
    if item.kind == "step":
        event.step.CopyFrom(pb.StepMetrics(**_known(pb.StepMetrics, p)))
    elif item.kind == "eval":
        event.eval.CopyFrom(pb.EvalMetrics(**_known(pb.EvalMetrics, p)))
    elif item.kind == "checkpoint_saved":
        event.checkpoint_saved.CopyFrom(pb.CheckpointSaved(
            step=p["step"], checkpoint=f"checkpoints/{p['checkpoint']}", final=p["final"]))
    elif item.kind == "worker_started":
        event.worker_started.CopyFrom(pb.WorkerStarted(**_known(pb.WorkerStarted, p)))
    elif item.kind == "state_change":
        change = pb.StateChange(state=_STATE_TO_PB[p["state"]], reason=p.get("reason", ""),
                                queue_position=p.get("queue_position", 0))
        if "error" in p:
            change.error.CopyFrom(pb.JobError(**p["error"]))
        event.state_change.CopyFrom(change)
    return event


def _known(message_type, payload: dict) -> dict:
    """The payload's keys that are fields of the message (reports may carry more)."""
    names = {f.name for f in message_type.DESCRIPTOR.fields}
    return {k: v for k, v in payload.items() if k in names}

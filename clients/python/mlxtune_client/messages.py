"""Friendly Python values to the API's messages: configs, enums, job states.

Callers write ``{"optimizer": "adamw", "learning_rate": 2e-4}`` or
``states=["running"]``; the protos want ``OPTIMIZER_ADAMW`` and
``JOB_STATE_RUNNING``. Mistakes are reported as field violations before any
call is made, named the way the server names them (``config.<field>``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from mlxtune.common.v1 import checkpoint_pb2 as common_pb
from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client.errors import FieldViolation, MlxtuneClientError

FINAL_STATES = (trainer_pb.JOB_STATE_SUCCEEDED, trainer_pb.JOB_STATE_FAILED,
                trainer_pb.JOB_STATE_CANCELLED)
# States a job's event stream ends in: the final ones, and INTERRUPTED (the
# server stopped; ResumeTrainingJob continues the job and its stream).
STREAM_END_STATES = FINAL_STATES + (trainer_pb.JOB_STATE_INTERRUPTED,)

_INTEGER_TYPES = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64,
                  FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64)
_FLOAT_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def enum_value(enum: EnumDescriptor, value: int | str, field: str) -> int:
    """An enum number from a number, its full name or its short name.

    ``"adamw"``, ``"ADAMW"`` and ``"OPTIMIZER_ADAMW"`` all give OPTIMIZER_ADAMW.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values_by_number:
            return value
    elif isinstance(value, str):
        wanted = value.strip().upper().replace("-", "_")
        prefix = _enum_prefix(enum)
        for candidate in (wanted, prefix + wanted):
            if candidate in enum.values_by_name and not candidate.endswith("_UNSPECIFIED"):
                return enum.values_by_name[candidate].number
    raise MlxtuneClientError.invalid_argument(
        f"{field}: unknown value {value!r}",
        [FieldViolation(field, f"must be one of {', '.join(enum_choices(enum))}, "
                               f"got {value!r}")])


def enum_choices(enum: EnumDescriptor) -> list[str]:
    """The short names of an enum's values, e.g. ["adam", "adamw", "sgd", ...]."""
    prefix = _enum_prefix(enum)
    return [v.name[len(prefix):].lower() for v in enum.values
            if not v.name.endswith("_UNSPECIFIED")]


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``running``."""
    value = enum.values_by_number.get(number)
    return value.name[len(_enum_prefix(enum)):].lower() if value else str(number)


def _enum_prefix(enum: EnumDescriptor) -> str:
    unspecified = enum.values[0].name  # "OPTIMIZER_UNSPECIFIED"
    return unspecified[: -len("UNSPECIFIED")]


def fill_message(message: Message, values: Mapping[str, Any], prefix: str) -> Message:
    """Set ``message``'s scalar and enum fields from ``values``, all problems at once."""
    violations: list[FieldViolation] = []
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = f"{prefix}.{key}"
        descriptor = fields.get(key)
        if descriptor is None:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(sorted(fields))
            violations.append(FieldViolation(name, f"no such field; {hint}"))
            continue
        if value is None:
            continue  # None means "take the server's default"
        try:
            _set_field(message, descriptor, value, name)
        except MlxtuneClientError as error:
            violations.extend(error.violations)
        except (TypeError, ValueError) as error:
            violations.append(FieldViolation(name, str(error)))
    if violations:
        raise MlxtuneClientError.invalid_argument(
            f"invalid {prefix}: " + ", ".join(v.field for v in violations), violations)
    return message


def _set_field(message: Message, descriptor: FieldDescriptor, value: Any, name: str) -> None:
    if descriptor.is_repeated:
        # Only lists of strings (target_modules) occur; a lone string is one item.
        items = [value] if isinstance(value, str) else list(value)
        getattr(message, descriptor.name)[:] = [str(item) for item in items]
        return
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        value = enum_value(descriptor.enum_type, value, name)
    elif descriptor.type == FieldDescriptor.TYPE_BOOL:
        value = _to_bool(value)
    elif descriptor.type in _INTEGER_TYPES:
        value = _to_int(value)
    elif descriptor.type in _FLOAT_TYPES:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        value = float(value)
    setattr(message, descriptor.name, value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise TypeError(f"expected true or false, got {value!r}")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(f"expected an integer, got {value!r}")


def training_config(config: Mapping[str, Any] | trainer_pb.TrainingConfig | None
                    ) -> trainer_pb.TrainingConfig:
    """A TrainingConfig from a dict (see :func:`fill_message`) or a message as is."""
    if config is None:
        return trainer_pb.TrainingConfig()
    if isinstance(config, trainer_pb.TrainingConfig):
        return config
    return fill_message(trainer_pb.TrainingConfig(), config, "config")


def adapter_config(method: str | int = "lora", **values: Any) -> common_pb.AdapterConfig:
    """An AdapterConfig; None values are left unset so the server's defaults apply."""
    values = {k: v for k, v in values.items() if v is not None}
    return fill_message(common_pb.AdapterConfig(), {"method": method, **values},
                        "adapter_config")


def dataset_format(value: str | int | None) -> int:
    if value is None:
        return trainer_pb.DATASET_FORMAT_UNSPECIFIED
    return enum_value(trainer_pb.DatasetFormat.DESCRIPTOR, value, "header.format")


def job_states(values: Iterable[str | int] | None) -> list[int]:
    return [enum_value(trainer_pb.JobState.DESCRIPTOR, v, f"states[{i}]")
            for i, v in enumerate(values or ())]


def parse_cli_value(text: str) -> Any:
    """A ``--set key=value`` value: JSON when it parses (numbers, true, lists),
    else the plain string (enum names like ``cosine``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def to_dict(message: Message) -> dict:
    """The proto3 JSON mapping with the .proto field names (what --json prints).

    Fields at their default value are printed too, so scripts find every key.
    """
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)

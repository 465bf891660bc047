"""Errors of the core, each carrying the gRPC status it maps to.

The core raises these; the servicers turn them into a status code plus
``google.rpc.Status`` details (``BadRequest`` field violations and an
``ErrorInfo`` reason) without knowing what went wrong. Anything else that
escapes a servicer is a bug and becomes INTERNAL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: which field, and what is wrong with it."""

    field: str
    description: str


@dataclass
class MlxtuneError(Exception):
    """Base error: a message a person can act on, a machine-readable reason."""

    message: str
    reason: str = "ERROR"
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    code = grpc.StatusCode.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(MlxtuneError):
    """The request is wrong; the field violations say where and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def of(cls, violations: list[FieldViolation], reason: str = "INVALID_ARGUMENT",
           message: str | None = None) -> "InvalidArgument":
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(message=message, reason=reason, violations=list(violations))

    @classmethod
    def field(cls, field_path: str, description: str,
              reason: str = "INVALID_ARGUMENT") -> "InvalidArgument":
        return cls.of([FieldViolation(field_path, description)], reason=reason)


class NotFound(MlxtuneError):
    """A named model, checkpoint, dataset or job does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MlxtuneError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MlxtuneError):
    """The request is well-formed but the system is not in a state to do it
    (e.g. an unsupported architecture, a running job's checkpoint)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MlxtuneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(MlxtuneError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(MlxtuneError):
    code = grpc.StatusCode.INTERNAL


class Violations:
    """Collects field violations so a request reports every problem at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, condition: bool, field_path: str, description: str) -> None:
        if not condition:
            self.add(field_path, description)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, reason: str = "INVALID_ARGUMENT", message: str | None = None) -> None:
        if self.items:
            raise InvalidArgument.of(self.items, reason=reason, message=message)

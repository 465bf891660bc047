"""The one exception the client raises, built from a gRPC status and its details.

The services answer every error with a status code, a one-line message and
``google.rpc.Status`` details: an ``ErrorInfo`` whose ``reason`` a program can
switch on, and for bad requests a ``BadRequest`` naming each offending field.
:class:`MlxtuneClientError` carries all of it, so callers never touch grpc.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from mlxtune.serving.status import error_details


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, e.g. ``config.learning_rate``."""

    field: str
    description: str


# eq=False keeps exceptions hashable and compared by identity, as Python expects.
@dataclass(eq=False)
class MlxtuneClientError(Exception):
    """A failed call: the status code, the server's message and its details.

    ``reason`` is the ``ErrorInfo`` reason (e.g. ``"CHECKPOINT_NOT_FOUND"``),
    empty when the error did not come from an mlxtune server (a proxy, the
    network). ``violations`` lists the ``BadRequest`` field violations.
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        head = f"{self.code.name}: {self.message}"
        if self.reason:
            head += f" [{self.reason}]"
        # Servers often spell the violations out in the message already.
        extra = [f"  {v.field}: {v.description}" for v in self.violations
                 if f"{v.field}: {v.description}" not in self.message]
        return "\n".join([head, *extra])

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> MlxtuneClientError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        message = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
        info, bad_request = error_details(error)
        return cls(
            code=code or grpc.StatusCode.UNKNOWN,
            message=message,
            reason=info.reason if info else "",
            domain=info.domain if info else "",
            metadata=dict(info.metadata) if info else {},
            violations=[FieldViolation(v.field, v.description)
                        for v in (bad_request.field_violations if bad_request else ())],
        )

    @classmethod
    def invalid_argument(cls, message: str, violations: list[FieldViolation] = (),
                         reason: str = "INVALID_ARGUMENT") -> MlxtuneClientError:
        """An error found before any call was made (e.g. an unknown config key)."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason,
                   domain="mlxtune-client", violations=list(violations))

    def to_dict(self) -> dict:
        """A JSON-friendly form, as ``mlxtune --json`` prints it."""
        return {
            "code": self.code.name,
            "message": self.message,
            "reason": self.reason,
            "metadata": self.metadata,
            "violations": [{"field": v.field, "description": v.description}
                           for v in self.violations],
        }

"""Core errors to gRPC status codes with ``google.rpc.Status`` details.

Servicers stay thin: decorate them with :func:`map_errors` (one method) or
:func:`map_errors_in` (a servicer class) and let the core raise
:class:`mlxtune.errors.MlxtuneError`. The client gets the error's code, a
``BadRequest`` listing the field violations when there are any, and always an
``ErrorInfo`` whose ``reason`` a program can switch on. Anything else that
escapes is a bug: it is logged with its traceback and answered INTERNAL,
never grpc's default UNKNOWN, which would tell the client nothing.

Clients read the details back with :func:`error_details`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mlxtune.errors import MlxtuneError

ERROR_DOMAIN = "mlxtune"
INTERNAL_REASON = "INTERNAL"

logger = logging.getLogger(__name__)


def to_rpc_status(error: MlxtuneError) -> status_pb2.Status:
    """The ``google.rpc.Status`` a core error is reported as."""
    details = []
    if error.violations:
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ])
        details.append(_pack(bad_request))
    details.append(_pack(error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN,
        metadata={str(k): str(v) for k, v in error.metadata.items()})))
    return status_pb2.Status(code=error.code.value[0], message=status_message(error),
                             details=details)


def status_message(error: MlxtuneError) -> str:
    """One line for people and for clients that ignore the details: the
    message, then any violation it does not already spell out."""
    missing = [f"{v.field}: {v.description}" for v in error.violations
               if f"{v.field}: {v.description}" not in error.message]
    return f"{error.message}: {'; '.join(missing)}" if missing else error.message


def abort_with_error(context: grpc.ServicerContext, error: MlxtuneError) -> NoReturn:
    """Ends the RPC with ``error``'s code and rich details (raises, like ``abort``)."""
    context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))
    raise AssertionError("abort_with_status returned")  # grpc always raises


def map_errors(method: Callable) -> Callable:
    """Decorates a servicer method (any of the four RPC shapes) so errors become statuses.

    Works for plain methods and for generators (server/bidi streams): errors
    raised while a stream is being produced are mapped too.
    """
    name = method.__qualname__

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = _find_context(args, kwargs)
        if context is None:  # a helper on the servicer, not an RPC: leave it alone
            return method(*args, **kwargs)
        try:
            result = method(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - mapping every error is the point
            _abort_for(error, context, name)
        if isinstance(result, Iterator):
            return _guarded_stream(result, context, name)
        return result

    wrapper.__mlxtune_maps_errors__ = True
    return wrapper


def map_errors_in(cls: type) -> type:
    """Class decorator: :func:`map_errors` on every public method ``cls`` defines.

    Public helpers that take no ``ServicerContext`` are called through unchanged.
    """
    for name, attribute in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(attribute):
            continue
        if not getattr(attribute, "__mlxtune_maps_errors__", False):
            setattr(cls, name, map_errors(attribute))
    return cls


def error_details(rpc_error: grpc.RpcError) -> tuple[
        error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    """Client side: the ``ErrorInfo`` and ``BadRequest`` of a failed call, when present."""
    if not isinstance(rpc_error, grpc.Call):
        return None, None  # e.g. raised before the call started: no trailers
    try:
        status = rpc_status.from_call(rpc_error)
    except ValueError:
        # The status was rewritten on the way (e.g. by a proxy): the details
        # no longer describe it.
        return None, None
    info = bad_request = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return info, bad_request


def _guarded_stream(responses: Iterator, context: grpc.ServicerContext, name: str) -> Iterator:
    try:
        yield from responses  # also forwards close() when grpc drops the stream
    except Exception as error:  # noqa: BLE001
        _abort_for(error, context, name)


def _abort_for(error: Exception, context: grpc.ServicerContext, name: str) -> NoReturn:
    if isinstance(error, MlxtuneError):
        abort_with_error(context, error)
    if not context.is_active():
        # The client cancelled or the deadline passed (grpc then raises out
        # of the request iterator): nobody is left to report to.
        raise error
    if context.code() not in (None, grpc.StatusCode.OK):
        # The handler chose its status itself (context.abort / set_code).
        raise error
    incident = uuid.uuid4().hex[:12]
    logger.error("%s failed (incident %s)", name, incident, exc_info=error)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error ({type(error).__name__}, incident {incident}); "
                "the server log has the details",
        details=[_pack(error_details_pb2.ErrorInfo(
            reason=INTERNAL_REASON, domain=ERROR_DOMAIN, metadata={"incident": incident}))])
    context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


def _find_context(args: tuple, kwargs: dict) -> grpc.ServicerContext | None:
    # Servicer methods take (self, request_or_iterator, context); callback-style
    # streams add a trailing callback, so look for the context by what it can do.
    for candidate in (kwargs.get("context"), *reversed(args)):
        if hasattr(candidate, "abort_with_status") and hasattr(candidate, "is_active"):
            return candidate
    return None


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed

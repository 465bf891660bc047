"""When a failed call may be tried again, and how long to wait before it.

Only calls that are safe to repeat are retried: reads, and creates that carry
a ``request_id`` (the server returns the first result for a repeated id).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from mlxtune.serving.status import error_details

T = TypeVar("T")

# What grpc-core reports when a stream's transport breaks under it (a proxy
# or server that vanished mid-stream) rather than what a server decided.
_TRANSPORT_FAILURES = ("rst_stream", "stream removed", "socket closed", "connection reset",
                       "broken pipe", "goaway", "end of tcp stream", "failed to connect")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (so clients that lost the same
    server do not all come back in the same instant)."""

    initial: float = 0.25
    maximum: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** max(0, attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


DEFAULT_BACKOFF = Backoff()  # frozen: one shared instance is safe


def is_transient(error: grpc.RpcError) -> bool:
    """True when the call failed on the way, not by the server's decision.

    UNAVAILABLE always qualifies (server down, restarting, draining, or the
    connection dropped). INTERNAL/UNKNOWN qualify only when grpc itself made
    them up for a broken transport: an mlxtune server attaches an ErrorInfo to
    every error it sends, and a real server-side bug must not be retried.
    """
    if not isinstance(error, grpc.Call):
        return False
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return False
    info, _ = error_details(error)
    details = (error.details() or "").lower()
    return info is None and any(text in details for text in _TRANSPORT_FAILURES)


def call_with_retry(call: Callable[[], T], retries: int, backoff: Backoff,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, repeated up to ``retries`` more times while it fails transiently."""
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            attempt += 1
            if attempt > retries or not is_transient(error):
                raise
            sleep(backoff.delay(attempt))

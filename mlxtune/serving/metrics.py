"""gRPC server metrics with go-grpc-prometheus names, labels and meaning.

Grafana dashboards for gRPC (e.g. 9186) are written against the Go
middleware, so this module copies it: the same five metric names, the label
names ``grpc_type``/``grpc_service``/``grpc_method``/``grpc_code``, Go's
code spellings (``Canceled``, ``InvalidArgument``) and its counting rules:

* a unary RPC counts one message received, and one sent when it succeeds;
* streams count every message as it goes through;
* ``handled`` is recorded once, when the RPC ends: handler returned, raised,
  aborted, or the client went away (``Canceled``/``DeadlineExceeded``);
* the handling time covers the whole RPC, a stream from first to last message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

# Go's codes.Code.String() for each status (note the single "l" in Canceled).
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# Prometheus' Go DefBuckets, then longer ones: training streams last hours.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_DEADLINE_SLACK_SECONDS = 0.1


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The ``grpc_type`` label value of a method, as go-grpc-prometheus spells it."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Records go-grpc-prometheus server metrics for every RPC it sees."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self.started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.",
            _LABELS, registry=registry)
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            _LABELS + ("grpc_code",), registry=registry)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been "
            "application-level handled by the server.",
            _LABELS, buckets=buckets, registry=registry)
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            _LABELS, registry=registry)
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.",
            _LABELS, registry=registry)

    # Like go-grpc-prometheus' InitializeMetrics: series exist (at 0) before
    # the first call, so rate() and dashboards work from the start.
    def initialize_method(self, service: str, method: str, rpc_type: str) -> None:
        labels = (rpc_type, service, method)
        for metric in (self.started, self.handling_seconds, self.msg_received, self.msg_sent):
            metric.labels(*labels)
        for code_name in GO_CODE_NAMES.values():
            self.handled.labels(*labels, code_name)

    def initialize_service(self, service_descriptor: Any) -> None:
        """Pre-creates the series of every method of a protobuf ``ServiceDescriptor``."""
        for method in service_descriptor.methods:
            self.initialize_method(service_descriptor.full_name, method.name,
                                   grpc_type(method.client_streaming, method.server_streaming))

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = (grpc_type(handler.request_streaming, handler.response_streaming),
                  service or "unknown", method)
        return _wrap_handler(handler, lambda context: _CallMonitor(self, labels, context))


class _CallMonitor:
    """One RPC's bookkeeping; ``finish`` records the outcome exactly once."""

    def __init__(self, metrics: MetricsInterceptor, labels: tuple[str, str, str],
                 context: grpc.ServicerContext) -> None:
        self._metrics = metrics
        self._labels = labels
        self._context = context
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._finished = False
        metrics.started.labels(*labels).inc()
        # The termination callback catches RPCs that end without the handler
        # noticing: grpc drops a response generator when the client cancels.
        context.add_callback(self._on_terminated)

    def is_active(self) -> bool:
        return self._context.is_active()

    def received(self) -> None:
        self._metrics.msg_received.labels(*self._labels).inc()

    def sent(self) -> None:
        self._metrics.msg_sent.labels(*self._labels).inc()

    def finish(self, code: grpc.StatusCode) -> grpc.StatusCode:
        with self._lock:
            if self._finished:
                return code
            self._finished = True
        self._metrics.handled.labels(*self._labels, GO_CODE_NAMES.get(code, "Unknown")).inc()
        self._metrics.handling_seconds.labels(*self._labels).observe(
            time.perf_counter() - self._start)
        return code

    def finish_from_context(self, raised: bool) -> grpc.StatusCode:
        """Records the code the client will see once the handler is done."""
        if not self._context.is_active():
            return self.finish(self._gone_code())
        code = self._context.code()  # set by abort()/set_code()
        if code is None:
            # grpc turns an exception nobody mapped into UNKNOWN
            code = grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        return self.finish(code)

    def _gone_code(self) -> grpc.StatusCode:
        # The client's deadline timer may fire a moment before ours, and then
        # arrives as a cancel; within that moment, call it what it is.
        if self._context.time_remaining() < _DEADLINE_SLACK_SECONDS:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _on_terminated(self) -> None:
        # Runs after the status went out too; then finish() is a no-op.
        self.finish(self._gone_code())


class _CountedRequests:
    """The request iterator handed to streaming-request handlers."""

    def __init__(self, requests: Iterator, monitor: _CallMonitor) -> None:
        self._requests = requests
        self._monitor = monitor

    def __iter__(self) -> _CountedRequests:
        return self

    def __next__(self) -> Any:
        request = next(self._requests)
        self._monitor.received()
        return request

    next = __next__  # grpc's own request iterator offers .next() too


def _counted_responses(responses: Iterator, monitor: _CallMonitor) -> Iterator:
    responses = iter(responses)
    try:
        while True:
            try:
                response = next(responses)
            except StopIteration:
                monitor.finish_from_context(raised=False)
                return
            # Counted as it is handed to grpc, which then writes it unless the
            # RPC already ended. (Counting when grpc asks for the next one
            # would miss the last message before a client's cancel.)
            if monitor.is_active():
                monitor.sent()
            yield response
    except GeneratorExit:
        monitor.finish(grpc.StatusCode.CANCELLED)
        raise
    except BaseException:
        monitor.finish_from_context(raised=True)
        raise
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()  # runs the handler's own cleanup now, not at garbage collection


def _wrap_handler(handler: grpc.RpcMethodHandler,
                  new_monitor: Callable[[grpc.ServicerContext], _CallMonitor],
                  ) -> grpc.RpcMethodHandler:
    serializers = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
    else:
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

    def arguments(request_or_iterator: Any, monitor: _CallMonitor) -> Any:
        if handler.request_streaming:
            return _CountedRequests(request_or_iterator, monitor)
        monitor.received()
        return request_or_iterator

    def unary_response(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        monitor = new_monitor(context)
        try:
            response = behavior(arguments(request_or_iterator, monitor), context)
        except BaseException:
            monitor.finish_from_context(raised=True)
            raise
        if monitor.finish_from_context(raised=False) == grpc.StatusCode.OK:
            monitor.sent()
        return response

    def streaming_response(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator:
        monitor = new_monitor(context)
        try:
            responses = behavior(arguments(request_or_iterator, monitor), context)
        except BaseException:
            monitor.finish_from_context(raised=True)
            raise
        return _counted_responses(responses, monitor)

    def non_blocking_response(request: Any, context: grpc.ServicerContext,
                              send_response_callback: Callable) -> Any:
        # grpc's callback-style streams (the health service's Watch) hold no
        # thread; a None response ends the stream.
        monitor = new_monitor(context)

        def send(response: Any) -> None:
            if response is None:
                monitor.finish_from_context(raised=False)
            send_response_callback(response)
            if response is not None:
                monitor.sent()

        try:
            return behavior(arguments(request, monitor), context, send)
        except BaseException:
            monitor.finish_from_context(raised=True)
            raise

    if not handler.response_streaming:
        wrapped = unary_response
    elif getattr(behavior, "experimental_non_blocking", False):
        wrapped = non_blocking_response
    else:
        wrapped = streaming_response
    # grpc reads these hints off the behavior itself.
    for hint in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, hint):
            setattr(wrapped, hint, getattr(behavior, hint))

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(wrapped, **serializers)

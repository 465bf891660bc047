"""A small gRPC service for the serving-layer tests, runnable as a real server.

``mlxtune.test.v1.EchoService`` has one method of each RPC shape plus a few
that fail on purpose. Messages are raw bytes (passthrough serializers); the
service still gets a protobuf descriptor, built here, so reflection and the
metrics' pre-initialisation see it like a generated service.

    python tests/servers/echo_server.py --host 127.0.0.1 --port 0 --metrics-port 0
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2

from mlxtune.errors import FieldViolation, InvalidArgument
from mlxtune.serving import common_arg_parser, configure_logging, map_errors_in, serve

SERVICE = "mlxtune.test.v1.EchoService"

# name -> (client_streaming, server_streaming)
METHODS = {
    "Echo": (False, False),
    "Fail": (False, False),
    "Crash": (False, False),
    "Abort": (False, False),
    "Count": (False, True),
    "FailMidStream": (False, True),
    "WaitForCancel": (False, True),
    "Collect": (True, False),
    "Chat": (True, True),
}

VIOLATIONS = [FieldViolation("config.rank", "must be positive, got 0"),
              FieldViolation("config.target_modules", "unknown module 'q_projj'")]

# Set while WaitForCancel waits, so a test cancels only once both messages went out.
waiting_for_cancel = threading.Event()


@map_errors_in
class EchoService:
    def Echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def Fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise InvalidArgument(message="the adapter config is invalid", reason="BAD_ADAPTER_CONFIG",
                              violations=list(VIOLATIONS), metadata={"model": "tiny"})

    def Crash(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("secret internal state")

    def Abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def Count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Request ``b"N"`` or ``b"N:SECONDS"``: N messages, SECONDS apart."""
        count, _, delay = request.decode().partition(":")
        for i in range(int(count)):
            if i and delay:
                time.sleep(float(delay))
            yield str(i).encode()

    def FailMidStream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"0"
        yield b"1"
        raise InvalidArgument.field("dataset.rows[2]", "empty prompt")

    def WaitForCancel(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"0"
        yield b"1"
        waiting_for_cancel.set()
        while context.is_active():
            time.sleep(0.01)

    def Collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    def Chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()


def register_descriptor() -> None:
    """Adds ``mlxtune/test/v1/echo.proto`` to the default pool (once)."""
    pool = descriptor_pool.Default()
    file_name = "mlxtune/test/v1/echo.proto"
    try:
        pool.FindFileByName(file_name)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name=file_name, package="mlxtune.test.v1", syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name])
    service = file.service.add(name="EchoService")
    for name, (client_streaming, server_streaming) in METHODS.items():
        service.method.add(name=name, input_type=".google.protobuf.BytesValue",
                           output_type=".google.protobuf.BytesValue",
                           client_streaming=client_streaming, server_streaming=server_streaming)
    pool.Add(file)


def generic_handler(service: EchoService) -> grpc.GenericRpcHandler:
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # No (de)serializers: requests and responses pass through as bytes.
    handlers = {name: makers[shape](getattr(service, name)) for name, shape in METHODS.items()}
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def servicer_spec() -> tuple:
    """The ``(add_fn, servicer, service_name)`` triple :func:`serve` takes."""
    register_descriptor()

    def add_to_server(handler: grpc.GenericRpcHandler, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers((handler,))

    return add_to_server, generic_handler(EchoService()), SERVICE


def main(argv: list[str] | None = None) -> int:
    parser = common_arg_parser("echo-server", "Echo service for the serving tests.",
                               default_port=0, default_metrics_port=0)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    running = serve([servicer_spec()], args,
                    on_shutdown=lambda: print("echo-server: on_shutdown ran", flush=True))
    return running.run_until_signal()


if __name__ == "__main__":
    sys.exit(main())

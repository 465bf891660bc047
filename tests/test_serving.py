"""The shared serving layer against a real gRPC server on loopback.

The server runs ``tests/servers/echo_server.py``'s generic service through
``mlxtune.serving.serve``: in this process for metrics, errors, health and
reflection; as a subprocess for the SIGTERM drain.
"""

from __future__ import annotations

import importlib.util
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry

from mlxtune.serving import GO_CODE_NAMES, common_arg_parser, error_details, serve

REPO = Path(__file__).resolve().parent.parent
ECHO_SCRIPT = REPO / "tests" / "servers" / "echo_server.py"


def _load_echo_module():
    spec = importlib.util.spec_from_file_location("echo_server", ECHO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["echo_server"] = module
    spec.loader.exec_module(module)
    return module


echo = _load_echo_module()
SERVICE = echo.SERVICE
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
STARTUP_LINE = re.compile(
    r"^mlxtune (\S+) listening on (\S+):(\d+) metrics (?:on (\S+):(\d+)|off)$")
# What Prometheus 2.x sends: it prefers OpenMetrics.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(*extra: str):
    parser = common_arg_parser("echo-test", "test", default_port=0, default_metrics_port=0)
    return parser.parse_args(["--host", "127.0.0.1", "--shutdown-delay-seconds", "0",
                              "--grace-seconds", "0", *extra])


class Echo:
    """A running in-process echo server, its metrics registry and a channel to it."""

    def __init__(self, *flags: str) -> None:
        self.registry = CollectorRegistry()
        self.running = serve([echo.servicer_spec()], parse_args(*flags), registry=self.registry)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")

    def close(self) -> None:
        self.channel.close()
        self.running.shutdown()

    def unary(self, method: str, request: bytes = b"") -> bytes:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=10)

    def server_stream(self, method: str, request: bytes = b"", **kwargs):
        return self.channel.unary_stream(f"/{SERVICE}/{method}")(request, **kwargs)

    def value(self, metric: str, method: str, rpc_type: str, service: str = SERVICE,
              **labels: str) -> float | None:
        labels.update(grpc_type=rpc_type, grpc_service=service, grpc_method=method)
        return self.registry.get_sample_value(metric, labels)

    def assert_rpcs(self, method: str, rpc_type: str, handled: dict[str, int],
                    received: int, sent: int, service: str = SERVICE) -> None:
        """Exact counts of one method; every code not in ``handled`` must be 0."""
        total = sum(handled.values())
        expected = {code: float(handled.get(code, 0)) for code in GO_CODE_NAMES.values()}
        actual = {code: self.value("grpc_server_handled_total", method, rpc_type, service,
                                   grpc_code=code) for code in expected}
        assert actual == expected
        assert self.value("grpc_server_started_total", method, rpc_type, service) == total
        assert self.value("grpc_server_handling_seconds_count", method, rpc_type, service) == total
        assert self.value("grpc_server_msg_received_total", method, rpc_type, service) == received
        assert self.value("grpc_server_msg_sent_total", method, rpc_type, service) == sent


@pytest.fixture
def server():
    running = Echo("--metrics-port", str(free_port()))
    yield running
    running.close()


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- metrics ------------------------------------------------------------------

def test_series_exist_before_any_call(server):
    for method, rpc_type in [("Echo", "unary"), ("Count", "server_stream"),
                             ("Collect", "client_stream"), ("Chat", "bidi_stream")]:
        server.assert_rpcs(method, rpc_type, handled={}, received=0, sent=0)
    server.assert_rpcs("Check", "unary", handled={}, received=0, sent=0, service=HEALTH)
    server.assert_rpcs("Watch", "server_stream", handled={}, received=0, sent=0, service=HEALTH)
    server.assert_rpcs("ServerReflectionInfo", "bidi_stream", handled={}, received=0, sent=0,
                       service=REFLECTION)


def test_unary(server):
    assert [server.unary("Echo", b"x%d" % i) for i in range(3)] == [b"x0", b"x1", b"x2"]
    server.assert_rpcs("Echo", "unary", handled={"OK": 3}, received=3, sent=3)


def test_server_stream(server):
    assert list(server.server_stream("Count", b"4", timeout=10)) == [b"0", b"1", b"2", b"3"]
    server.assert_rpcs("Count", "server_stream", handled={"OK": 1}, received=1, sent=4)


def test_client_stream(server):
    collect = server.channel.stream_unary(f"/{SERVICE}/Collect")
    assert collect(iter([b"a", b"b", b"c"]), timeout=10) == b"abc"
    server.assert_rpcs("Collect", "client_stream", handled={"OK": 1}, received=3, sent=1)


def test_bidi_stream(server):
    chat = server.channel.stream_stream(f"/{SERVICE}/Chat")
    assert list(chat(iter([b"a", b"b", b"c"]), timeout=10)) == [b"A", b"B", b"C"]
    server.assert_rpcs("Chat", "bidi_stream", handled={"OK": 1}, received=3, sent=3)


def test_client_cancels_server_stream_midway(server):
    echo.waiting_for_cancel.clear()
    call = server.server_stream("WaitForCancel", timeout=10)
    assert [next(call), next(call)] == [b"0", b"1"]
    assert echo.waiting_for_cancel.wait(5)
    call.cancel()
    wait_until(lambda: server.value("grpc_server_handled_total", "WaitForCancel",
                                    "server_stream", grpc_code="Canceled") == 1)
    server.assert_rpcs("WaitForCancel", "server_stream", handled={"Canceled": 1},
                       received=1, sent=2)


def test_deadline_ends_server_stream(server):
    with pytest.raises(grpc.RpcError) as failure:
        list(server.server_stream("WaitForCancel", timeout=0.5))
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.value("grpc_server_handled_total", "WaitForCancel",
                                    "server_stream", grpc_code="DeadlineExceeded") == 1)
    server.assert_rpcs("WaitForCancel", "server_stream", handled={"DeadlineExceeded": 1},
                       received=1, sent=2)


def test_client_cancels_bidi_stream_midway(server):
    release = threading.Event()

    def requests():
        yield b"a"
        yield b"b"
        release.wait(10)  # the server now waits for a third message that never comes

    call = server.channel.stream_stream(f"/{SERVICE}/Chat")(requests(), timeout=10)
    try:
        assert [next(call), next(call)] == [b"A", b"B"]
        call.cancel()
        wait_until(lambda: server.value("grpc_server_handled_total", "Chat", "bidi_stream",
                                        grpc_code="Canceled") == 1)
    finally:
        release.set()
    server.assert_rpcs("Chat", "bidi_stream", handled={"Canceled": 1}, received=2, sent=2)


# --- errors -------------------------------------------------------------------

def test_core_error_becomes_status_with_details(server):
    with pytest.raises(grpc.RpcError) as failure:
        server.unary("Fail")
    error = failure.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "the adapter config is invalid: config.rank: must be positive, got 0; "
        "config.target_modules: unknown module 'q_projj'")
    info, bad_request = error_details(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "BAD_ADAPTER_CONFIG", "mlxtune", {"model": "tiny"})
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        (v.field, v.description) for v in echo.VIOLATIONS]
    server.assert_rpcs("Fail", "unary", handled={"InvalidArgument": 1}, received=1, sent=0)


def test_core_error_in_the_middle_of_a_stream(server):
    call = server.server_stream("FailMidStream", timeout=10)
    received = []
    with pytest.raises(grpc.RpcError):
        for message in call:
            received.append(message)
    assert received == [b"0", b"1"]
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert call.details() == "dataset.rows[2]: empty prompt"
    info, bad_request = error_details(call)
    assert info.reason == "INVALID_ARGUMENT"
    assert [v.field for v in bad_request.field_violations] == ["dataset.rows[2]"]
    server.assert_rpcs("FailMidStream", "server_stream", handled={"InvalidArgument": 1},
                       received=1, sent=2)


def test_unexpected_exception_becomes_internal_not_unknown(server, caplog):
    with pytest.raises(grpc.RpcError) as failure:
        server.unary("Crash")
    error = failure.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in error.details()
    assert "secret internal state" not in error.details()  # stays in the server log
    info, bad_request = error_details(error)
    assert (info.reason, info.domain, bad_request) == ("INTERNAL", "mlxtune", None)
    assert info.metadata["incident"] in error.details()
    assert "secret internal state" in caplog.text and "Traceback" in caplog.text
    server.assert_rpcs("Crash", "unary", handled={"Internal": 1}, received=1, sent=0)


def test_handler_abort_keeps_its_code(server):
    with pytest.raises(grpc.RpcError) as failure:
        server.unary("Abort")
    assert (failure.value.code(), failure.value.details()) == (
        grpc.StatusCode.NOT_FOUND, "no such thing")
    assert error_details(failure.value) == (None, None)
    server.assert_rpcs("Abort", "unary", handled={"NotFound": 1}, received=1, sent=0)


def test_error_details_of_a_plain_status(server):
    with pytest.raises(grpc.RpcError) as failure:
        server.unary("NoSuchMethod")
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_details(failure.value) == (None, None)


# --- health, reflection, /metrics ----------------------------------------------

def test_health_serving_for_server_and_each_service(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", SERVICE, HEALTH, REFLECTION):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    server.assert_rpcs("Check", "unary", handled={"OK": 4}, received=4, sent=4, service=HEALTH)


def test_reflection_lists_services(server):
    database = ProtoReflectionDescriptorDatabase(server.channel)
    assert set(database.get_services()) == {SERVICE, HEALTH, REFLECTION}
    echo_file = database.FindFileContainingSymbol(SERVICE)
    assert [m.name for m in echo_file.service[0].method] == list(echo.METHODS)


def test_reflection_can_be_turned_off():
    running = Echo("--no-reflection")
    try:
        with pytest.raises(grpc.RpcError) as failure:
            ProtoReflectionDescriptorDatabase(running.channel).get_services()
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.close()


def scrape(server, accept: str | None) -> tuple[str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.running.metrics_port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


@pytest.mark.parametrize("accept", [None, PROMETHEUS_ACCEPT])
def test_metrics_endpoint_serves_classic_text(server, accept):
    server.unary("Echo")
    content_type, text = scrape(server, accept)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in text and "_created" not in text
    assert "# TYPE grpc_server_handled_total counter" in text
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="Echo",'
            f'grpc_service="{SERVICE}",grpc_type="unary"}} 1.0') in text


def test_promtool_accepts_the_metrics(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not on PATH (Debian package 'prometheus')"
        if os.environ.get("MLXTUNE_REQUIRE_PROMTOOL") == "1":
            pytest.fail(message + " and MLXTUNE_REQUIRE_PROMTOOL=1")
        pytest.skip(message)
    server.unary("Echo")
    list(server.server_stream("Count", b"2", timeout=10))
    _, text = scrape(server, PROMETHEUS_ACCEPT)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # no lint complaints either


# --- flags and process lifecycle ------------------------------------------------

def test_flags_default_to_environment(monkeypatch):
    monkeypatch.setenv("MLXTUNE_PORT", "7001")
    monkeypatch.setenv("MLXTUNE_METRICS_PORT", "0")
    monkeypatch.setenv("MLXTUNE_STORE", "/tmp/store")
    monkeypatch.setenv("MLXTUNE_NO_REFLECTION", "1")
    monkeypatch.setenv("MLXTUNE_LOG_LEVEL", "debug")
    parser = common_arg_parser("svc", "test", default_port=1, default_metrics_port=2)
    args = parser.parse_args([])
    assert (args.port, args.metrics_port, str(args.store), args.no_reflection, args.log_level) == (
        7001, 0, "/tmp/store", True, "DEBUG")
    assert parser.parse_args(["--port", "7002"]).port == 7002  # the flag wins
    assert "MLXTUNE_METRICS_PORT" in parser.format_help()
    monkeypatch.setenv("MLXTUNE_PORT", "not-a-port")
    with pytest.raises(SystemExit):
        common_arg_parser("svc", "test", default_port=1, default_metrics_port=2).parse_args([])


def read_startup_line(process: subprocess.Popen, timeout: float = 20.0) -> re.Match:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "server printed no startup line"
    line = process.stdout.readline().strip()
    match = STARTUP_LINE.match(line)
    assert match, line
    return match


def test_sigterm_flips_health_and_drains_in_flight_stream():
    process = subprocess.Popen(
        [sys.executable, str(ECHO_SCRIPT), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--shutdown-delay-seconds", "1.5", "--grace-seconds", "10"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        name, host, port, _, _ = read_startup_line(process).groups()
        assert (name, host) == ("echo-server", "127.0.0.1")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)

        def status(service: str = "") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        # 12 messages 0.25 s apart: it outlives the 1.5 s shutdown delay.
        stream = channel.unary_stream(f"/{SERVICE}/Count")(b"12:0.25", timeout=30)
        received = [next(stream)]
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=1.4)
        assert status(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        received += list(stream)
        assert received == [str(i).encode() for i in range(12)]
        assert stream.code() == grpc.StatusCode.OK
        assert process.wait(timeout=15) == 0
        assert "echo-server: on_shutdown ran" in process.stdout.read()
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()

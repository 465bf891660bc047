"""Server bootstrap shared by both services' ``__main__``.

One place decides how an mlxtune service listens, reports health, exposes
metrics and shuts down, so the two services behave the same behind a load
balancer or a mesh:

* gRPC with the go-grpc-prometheus metrics interceptor, ``grpc.health.v1``
  (overall ``""`` and every service) and server reflection;
* ``/metrics`` on its own HTTP port, classic Prometheus text format;
* on SIGTERM/SIGINT: health NOT_SERVING, a short pause so load balancers
  stop routing here, a graceful drain of in-flight RPCs, ``on_shutdown``,
  exit 0. A second signal ends the process at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from mlxtune.serving.exporter import MetricsHTTPServer, start_metrics_server
from mlxtune.serving.metrics import MetricsInterceptor

logger = logging.getLogger(__name__)

# (generated add_XServicer_to_server, servicer instance, "pkg.v1.XService")
ServicerSpec = tuple[Callable[[Any, grpc.Server], None], Any, str]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # adapter chunks and uploaded dataset parts

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping quiet connections (a loss stream can be silent for minutes) so
    # proxies and NATs keep them open, and dead peers are noticed.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Accept client keepalive pings every 10 s, even with no call open: the
    # default (one per 5 min while idle, never without calls) makes grpc
    # answer common client settings with GOAWAY "too_many_pings".
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A second server on a busy port must fail, not silently share its traffic.
    ("grpc.so_reuseport", 0),
]


def common_arg_parser(prog: str, description: str, default_port: int,
                      default_metrics_port: int) -> argparse.ArgumentParser:
    """The flags every service takes; each defaults to an environment variable."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Every flag can also be set by the environment variable named in its help; "
               "a flag on the command line wins.")
    parser.set_defaults(service_name=prog)
    env = os.environ.get
    parser.add_argument("--host", default=env("MLXTUNE_HOST", "0.0.0.0"),
                        help="address to listen on (gRPC and metrics) [MLXTUNE_HOST]")
    parser.add_argument("--port", type=_port, default=env("MLXTUNE_PORT", str(default_port)),
                        help="gRPC port; 0 picks a free one [MLXTUNE_PORT]")
    parser.add_argument("--metrics-port", type=_metrics_port,
                        default=env("MLXTUNE_METRICS_PORT", str(default_metrics_port)),
                        help="Prometheus /metrics port; 0 picks a free one, 'off' turns metrics "
                             "off [MLXTUNE_METRICS_PORT]")
    parser.add_argument("--store", metavar="DIR", type=Path,
                        default=env("MLXTUNE_STORE", ".state/store"),
                        help="checkpoint store directory, shared by both services [MLXTUNE_STORE]")
    parser.add_argument("--no-reflection", action="store_true",
                        default=_env_flag("MLXTUNE_NO_REFLECTION"),
                        help="turn off gRPC server reflection [MLXTUNE_NO_REFLECTION=1]")
    parser.add_argument("--grace-seconds", type=float,
                        default=env("MLXTUNE_GRACE_SECONDS", "20"),
                        help="on shutdown, how long in-flight RPCs may finish before they are "
                             "cancelled; keep delay + grace under the orchestrator's kill "
                             "timeout (Kubernetes: 30 s) [MLXTUNE_GRACE_SECONDS]")
    parser.add_argument("--shutdown-delay-seconds", type=float,
                        default=env("MLXTUNE_SHUTDOWN_DELAY_SECONDS", "5"),
                        help="on shutdown, how long to keep serving while health says "
                             "NOT_SERVING, so load balancers stop sending new calls "
                             "[MLXTUNE_SHUTDOWN_DELAY_SECONDS]")
    parser.add_argument("--max-workers", type=int, default=env("MLXTUNE_MAX_WORKERS", "32"),
                        help="threads serving RPCs; each open stream holds one "
                             "[MLXTUNE_MAX_WORKERS]")
    parser.add_argument("--log-level", type=_log_level, default=env("MLXTUNE_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR [MLXTUNE_LOG_LEVEL]")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class RunningServer:
    """A started service: its bound ports, and the way to stop it."""

    def __init__(self, name: str, args: argparse.Namespace, server: grpc.Server,
                 health_servicer: health.HealthServicer, port: int,
                 metrics_http: MetricsHTTPServer | None, metrics: MetricsInterceptor,
                 on_shutdown: Callable[[], None] | None,
                 on_drain: Callable[[], None] | None = None,
                 thread_pools: Sequence[futures.ThreadPoolExecutor] = ()) -> None:
        self.name = name
        self.server = server
        self.health = health_servicer
        self.metrics = metrics
        self.host: str = args.host
        self.port = port
        self.metrics_port: int | None = metrics_http.port if metrics_http else None
        self._metrics_http = metrics_http
        self._grace_seconds: float = args.grace_seconds
        self._shutdown_delay: float = args.shutdown_delay_seconds
        self._on_shutdown = on_shutdown
        self._on_drain = on_drain
        self._thread_pools = thread_pools
        self._stop_requested = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._exit_code: int | None = None

    @property
    def address(self) -> str:
        return _join_host_port(self.host, self.port)

    def startup_line(self) -> str:
        """One machine-readable line that scripts and tests read the ports from."""
        metrics = (f"metrics on {_join_host_port(self.host, self.metrics_port)}"
                   if self.metrics_port else "metrics off")
        return f"mlxtune {self.name} listening on {self.address} {metrics}"

    def shutdown(self) -> int:
        """Drains and stops everything; safe to call more than once. Returns the exit code."""
        with self._shutdown_lock:
            if self._exit_code is not None:
                return self._exit_code
            logger.info("%s: NOT_SERVING; draining in %.1f s", self.name, self._shutdown_delay)
            self.health.enter_graceful_shutdown()  # every service NOT_SERVING, and stays so
            time.sleep(self._shutdown_delay)  # still serving while load balancers notice
            drain_started = time.monotonic()
            if self._on_drain is not None:
                # Ends what would otherwise hold streams open past the grace
                # period (e.g. running training jobs, whose streams end once
                # their workers have saved and stopped).
                try:
                    self._on_drain()
                except Exception:  # noqa: BLE001 - draining must go on
                    logger.exception("%s: on_drain failed", self.name)
            # One grace period in all: what on_drain used is not given twice.
            remaining = max(0.0, self._grace_seconds - (time.monotonic() - drain_started))
            self.server.stop(remaining).wait()
            self._exit_code = 0
            if self._on_shutdown is not None:
                try:
                    self._on_shutdown()
                except Exception:  # noqa: BLE001 - report, and still stop cleanly
                    logger.exception("%s: on_shutdown failed", self.name)
                    self._exit_code = 1
            if self._metrics_http is not None:
                self._metrics_http.stop()
            for pool in self._thread_pools:
                pool.shutdown(wait=False)
            logger.info("%s: stopped", self.name)
            return self._exit_code

    def request_stop(self) -> None:
        """Makes :meth:`run_until_signal` shut down, as a signal would."""
        self._stop_requested.set()

    def run_until_signal(self) -> int:
        """Blocks until SIGTERM/SIGINT, then shuts down. Call from the main thread."""
        def on_signal(signum: int, _frame: Any) -> None:
            logger.info("%s: got %s", self.name, signal.Signals(signum).name)
            # A second signal must end a stuck drain at once.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            self._stop_requested.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        # A timed wait lets the interpreter run the signal handler promptly.
        while not self._stop_requested.wait(timeout=0.5):
            pass
        return self.shutdown()


def serve(servicers: Sequence[ServicerSpec], args: argparse.Namespace,
          registry: CollectorRegistry | None = None,
          on_shutdown: Callable[[], None] | None = None, *,
          on_drain: Callable[[], None] | None = None,
          name: str | None = None) -> RunningServer:
    """Starts a gRPC server for ``servicers`` configured by ``args``; prints the startup line.

    ``args`` comes from :func:`common_arg_parser`. ``registry`` defaults to
    prometheus_client's process-wide one. Returns once the server listens.
    """
    name = name or getattr(args, "service_name", None) or "service"
    metrics = MetricsInterceptor(REGISTRY if registry is None else registry)
    rpc_threads = futures.ThreadPoolExecutor(max_workers=args.max_workers,
                                             thread_name_prefix="grpc")
    # Health answers from its own threads: a pool full of long streams must
    # not make the service look dead to its load balancer.
    health_threads = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
    server = grpc.server(rpc_threads, interceptors=[metrics], options=SERVER_OPTIONS)

    service_names = []
    for add_to_server, servicer, service_name in servicers:
        add_to_server(servicer, server)
        service_names.append(service_name)

    health_servicer = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=health_threads)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names.append(health.SERVICE_NAME)
    if not args.no_reflection:
        service_names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(service_names, server)
    for service_name in service_names:
        _initialize_metrics(metrics, service_name)

    port = server.add_insecure_port(_join_host_port(args.host, args.port))
    try:
        metrics_http = (start_metrics_server(args.host, args.metrics_port, metrics.registry)
                        if args.metrics_port is not None else None)
    except OSError:
        server.stop(None)  # release the gRPC port we already hold
        raise
    server.start()
    for service_name in ["", *service_names]:
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)

    running = RunningServer(name, args, server, health_servicer, port, metrics_http, metrics,
                            on_shutdown, on_drain=on_drain,
                            thread_pools=(rpc_threads, health_threads))
    logger.info("%s: serving %s", name, ", ".join(service_names))
    print(running.startup_line(), flush=True)
    return running


def _initialize_metrics(metrics: MetricsInterceptor, service_name: str) -> None:
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        # No descriptor (a hand-written generic handler): its series appear
        # with the first call instead.
        logger.debug("no descriptor for %s; metrics start at first call", service_name)
        return
    metrics.initialize_service(descriptor)


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"  # IPv6 literal
    return f"{host}:{port}"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def _metrics_port(text: str) -> int | None:
    return None if text.strip().lower() == "off" else _port(text)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise argparse.ArgumentTypeError(f"expected DEBUG, INFO, WARNING or ERROR, got {text!r}")
    return level


def _env_flag(variable: str) -> bool:
    value = os.environ.get(variable, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{variable}: expected 1/0, true/false, yes/no or on/off, got {value!r}")

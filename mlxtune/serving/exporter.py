"""The ``/metrics`` HTTP endpoint, always in the classic Prometheus text format.

prometheus_client negotiates OpenMetrics when the scraper's Accept header
asks for it. We answer every scrape in the classic format (text/plain
0.0.4) instead: every Prometheus version reads it, and so does
``promtool check metrics``, which rejects OpenMetrics; one format for all
scrapers means what CI checks is what production serves.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # a scrape every few seconds would drown the service's own log


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape must not hold the process at exit


class MetricsHTTPServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound one."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_address[1]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsHTTPServer:
    """Serves ``registry`` on ``http://host:port/metrics`` (port 0 picks a free one)."""
    # go-grpc-prometheus exports no *_created series; without this every
    # counter and histogram would carry a second, unused series.
    prometheus_client.disable_created_metrics()
    app = make_wsgi_app(registry)

    def classic_text_only(environ: dict, start_response: object) -> object:
        environ.pop("HTTP_ACCEPT", None)  # see the module docstring
        return app(environ, start_response)

    # WSGIServer is IPv4-only unless told the family (e.g. for "::").
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("_MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(sockaddr[0], port, classic_text_only, server_class, _QuietHandler)
    # A short poll interval makes stop() quick; an idle wakeup costs nothing.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="metrics-http", daemon=True)
    thread.start()
    return MetricsHTTPServer(httpd, thread)

"""The serving layer both services share: metrics, error statuses, bootstrap.

* :mod:`.metrics` - go-grpc-prometheus server metrics as one interceptor;
* :mod:`.status` - core errors to gRPC codes with ``google.rpc`` details;
* :mod:`.server` - flags, health, reflection, ``/metrics``, graceful shutdown.
"""

from mlxtune.serving.metrics import GO_CODE_NAMES, MetricsInterceptor
from mlxtune.serving.server import (
    RunningServer,
    ServicerSpec,
    common_arg_parser,
    configure_logging,
    serve,
)
from mlxtune.serving.status import (
    abort_with_error,
    error_details,
    map_errors,
    map_errors_in,
    to_rpc_status,
)

__all__ = [
    "GO_CODE_NAMES",
    "MetricsInterceptor",
    "RunningServer",
    "ServicerSpec",
    "abort_with_error",
    "common_arg_parser",
    "configure_logging",
    "error_details",
    "map_errors",
    "map_errors_in",
    "serve",
    "to_rpc_status",
]

"""python -m services.trainer_service — the trainer service."""

from __future__ import annotations

import os
import sys

from prometheus_client import REGISTRY

from mlxtune.serving import common_arg_parser, configure_logging, serve
from mlxtune.trainer.v1 import trainer_service_pb2_grpc
from services.trainer_service.core import TrainerCore
from services.trainer_service.metrics import TrainerMetrics
from services.trainer_service.servicer import SERVICE_NAME, TrainerServicer


def build_parser():
    parser = common_arg_parser(
        "python -m services.trainer_service",
        "Trains adapters with MLX: datasets, training jobs (one worker process each) and "
        "their event streams.", default_port=50052, default_metrics_port=9465)
    parser.add_argument(
        "--state-dir", default=os.environ.get("MLXTUNE_STATE_DIR"),
        help="where jobs and their events persist (SQLite) and workers log "
             "[MLXTUNE_STATE_DIR] (default: <store>/trainer)")
    parser.add_argument(
        "--data-root", default=os.environ.get("MLXTUNE_DATA_ROOT"),
        help="folder whose JSONL files CreateDataset may register [MLXTUNE_DATA_ROOT] "
             "(default: none; uploads only)")
    parser.add_argument(
        "--max-concurrent-jobs", type=int,
        default=int(os.environ.get("MLXTUNE_MAX_CONCURRENT_JOBS", "1")),
        help="training jobs that run at once; the rest queue [MLXTUNE_MAX_CONCURRENT_JOBS] "
             "(default: %(default)s)")
    parser.add_argument(
        "--worker-threads", type=int,
        default=int(os.environ.get("MLXTUNE_WORKER_THREADS", "0")),
        help="BLAS threads per training worker; 0 divides the machine's cores among the "
             "concurrent jobs [MLXTUNE_WORKER_THREADS] (default: %(default)s)")
    return parser


def worker_environment(threads: int, max_concurrent_jobs: int) -> dict:
    """BLAS threads for each worker: concurrent jobs must not oversubscribe the
    cores, or OpenBLAS's spinning threads slow everything down (measured: a
    2-thread OpenBLAS on a busy 2-core box ran below the reference BLAS)."""
    if threads <= 0:
        if "OPENBLAS_NUM_THREADS" in os.environ:
            return {}  # the operator chose
        threads = max(1, (os.cpu_count() or 1) // max(1, max_concurrent_jobs))
    return {"OPENBLAS_NUM_THREADS": str(threads)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    metrics = TrainerMetrics(REGISTRY)
    core = TrainerCore(args.store, args.state_dir, data_root=args.data_root,
                       max_concurrent_jobs=args.max_concurrent_jobs, on_event=metrics.on_event,
                       worker_env=worker_environment(args.worker_threads,
                                                     args.max_concurrent_jobs))
    metrics.track_jobs(core.db)
    core.start()
    running = serve([(trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server,
                      TrainerServicer(core), SERVICE_NAME)], args, name="trainer",
                    on_drain=lambda: core.stop(args.grace_seconds))
    return running.run_until_signal()


if __name__ == "__main__":
    sys.exit(main())

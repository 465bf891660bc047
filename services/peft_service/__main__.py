"""python -m services.peft_service — the PEFT service."""

from __future__ import annotations

import logging
import os
import sys

from prometheus_client import REGISTRY

from mlxtune.peft.v1 import peft_service_pb2_grpc
from mlxtune.serving import common_arg_parser, configure_logging, serve
from services.peft_service.metrics import PeftMetrics


def build_parser():
    parser = common_arg_parser(
        "python -m services.peft_service",
        "Applies LoRA / DoRA / full fine-tuning configs to named models and keeps "
        "prepared checkpoints in the shared store.",
        default_port=50051, default_metrics_port=9464)
    parser.add_argument(
        "--models-dir", default=os.environ.get("MLXTUNE_MODELS_DIR", ".state/models"),
        help="folder of models (HF folders, MLX-quantized folders, .gguf files) that model "
             "names resolve to [MLXTUNE_MODELS_DIR] (default: %(default)s)")
    parser.add_argument(
        "--no-hub", action="store_true",
        default=os.environ.get("MLXTUNE_NO_HUB", "") not in ("", "0"),
        help="never download hub ids; only the models dir and the local Hugging Face "
             "cache are searched [MLXTUNE_NO_HUB=1]")
    parser.add_argument(
        "--generate-cache-size", type=int,
        default=int(os.environ.get("MLXTUNE_GENERATE_CACHE_SIZE", "2")),
        help="models (base + adapter) Generate keeps loaded [MLXTUNE_GENERATE_CACHE_SIZE] "
             "(default: %(default)s)")
    parser.add_argument(
        "--max-import-bytes", type=int,
        default=int(os.environ.get("MLXTUNE_MAX_IMPORT_BYTES", str(4 << 30))),
        help="largest adapter ImportAdapter accepts [MLXTUNE_MAX_IMPORT_BYTES] "
             "(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLX binds its BLAS when mlx.core is first imported: switch it to OpenBLAS
    # before anything below imports it (the core and the servicer do).
    from mlxtune import blas

    # This process's MLX work is token-by-token generation (matrix-vector
    # products) beside a thread pool serving RPCs: one BLAS thread is as fast
    # and never spins against the RPC threads (measured: 2 spinning threads
    # made generation 2x slower on a busy 2-core box). An operator's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    blas_info = blas.activate()
    from services.peft_service.core import PeftCore
    from services.peft_service.servicer import SERVICE_NAME, PeftServicer

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    logging.getLogger(__name__).info("MLX CPU BLAS: %s", blas_info)
    core = PeftCore(args.store, args.models_dir, allow_hub=not args.no_hub,
                    metrics=PeftMetrics(REGISTRY), generate_cache_size=args.generate_cache_size,
                    max_import_bytes=args.max_import_bytes)
    running = serve([(peft_service_pb2_grpc.add_PeftServiceServicer_to_server,
                      PeftServicer(core), SERVICE_NAME)], args, name="peft")
    return running.run_until_signal()


if __name__ == "__main__":
    sys.exit(main())

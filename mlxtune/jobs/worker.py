"""The training worker: ``python -m mlxtune.jobs.worker <spec.json>``.

One process per job. It activates the optimized BLAS before MLX loads,
loads the checkpoint and data, trains, writes checkpoints into the shared
store and reports every step on stdout (``mlxtune.jobs.protocol``). The
server decides the job's state from these reports and the exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

from mlxtune.jobs import protocol

log = logging.getLogger("mlxtune.worker")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    # Must run before anything imports mlx.core (see mlxtune.blas).
    from mlxtune.blas import activate

    blas = activate()
    logging.basicConfig(level=os.environ.get("MLXTUNE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reporter = protocol.Reporter()
    commands = protocol.Commands()
    spec = json.loads(Path(argv[0]).read_text())
    log.info("job %s: BLAS %s", spec["job_id"], blas.name)
    from mlxtune.errors import MlxtuneError

    try:
        from mlxtune.jobs.training_run import TrainingRun

        TrainingRun(spec, reporter, commands, blas_name=blas.name).run()
    except MlxtuneError as exc:
        log.error("job %s failed: %s", spec["job_id"], exc)
        reporter.report(protocol.FAILED, reason=exc.reason, message=str(exc))
        return 1
    except Exception as exc:  # noqa: BLE001 - report anything, then die
        traceback.print_exc()
        reporter.report(protocol.FAILED, reason="TRAINING_ERROR",
                        message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the server dies, so no orphan trains on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    parent = os.environ.get("MLXTUNE_PARENT_PID")
    if parent and os.getppid() != int(parent):
        os._exit(3)  # the server died before the request took effect


if __name__ == "__main__":
    sys.exit(main())

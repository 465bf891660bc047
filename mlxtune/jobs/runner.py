"""One worker process per job: start it, read its reports, stop or kill it.

The worker is ``python -m mlxtune.jobs.worker <spec.json>`` in a process
session of its own. It reports one JSON object per line on stdout (see
``mlxtune.jobs.protocol``), takes commands on stdin ("cancel", "save-and-stop")
and writes its log to ``worker.log``. Whatever happens to it — a clean end,
an exception, SIGKILL, the kernel's OOM killer — the runner turns the exit
into exactly one final state for its job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mlxtune.jobs import protocol
from mlxtune.jobs.db import CANCELLED, FAILED, INTERRUPTED, SUCCEEDED, JobRecord

if TYPE_CHECKING:
    from mlxtune.jobs.manager import JobManager

log = logging.getLogger(__name__)
CANCEL_GRACE_SECONDS = 5.0


class WorkerRunner:
    def __init__(self, manager: "JobManager", job: JobRecord, job_dir: Path, spec: dict,
                 env: dict) -> None:
        self.manager = manager
        self.job = job
        self.job_dir = job_dir
        self.spec = spec
        self.env = env
        self.process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._cancel_requested = False
        self._stop_requested = False
        self._finished: dict | None = None
        self._failure: dict | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def log_path(self) -> Path:
        return self.job_dir / "worker.log"

    def start(self) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.job_dir / "spec.json"
        spec_path.write_text(json.dumps(self.spec, indent=2))
        # The worker asks the kernel for SIGKILL when this process dies (it
        # checks MLXTUNE_PARENT_PID to close the race); a preexec_fn would do
        # it here, but is unsafe in a process with threads.
        env = dict(os.environ, **self.env, PYTHONUNBUFFERED="1",
                   MLXTUNE_PARENT_PID=str(os.getpid()))
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlxtune.jobs.worker", str(spec_path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                env=env, start_new_session=True)
        self._thread = threading.Thread(target=self._follow, name=f"worker-{self.job.id}",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- control ------------------------------------------------------------

    def request_cancel(self) -> None:
        """Stop now: no checkpoint is saved. SIGKILL follows if it lingers."""
        self._cancel_requested = True
        self._send("cancel")
        self._signal(signal.SIGTERM)
        timer = threading.Timer(CANCEL_GRACE_SECONDS, self.kill)
        timer.daemon = True
        timer.start()

    def request_stop(self, save: bool = True) -> None:
        """Stop at the next step boundary, saving a resumable checkpoint first."""
        self._stop_requested = True
        self._send("save-and-stop" if save else "cancel")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _send(self, command: str) -> None:
        try:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write((command + "\n").encode())
            self.process.stdin.flush()
        except (OSError, AssertionError, ValueError):
            pass  # the worker is gone already

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    # -- reports ------------------------------------------------------------

    def _follow(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("job %s: unreadable worker line %r", self.job.id, line[:200])
                continue
            try:
                self._handle(message)
            except Exception:  # noqa: BLE001 - a bad report must not orphan the job
                log.exception("job %s: could not handle %r", self.job.id, message)
        returncode = self.process.wait()
        self._finish(returncode)

    def _handle(self, message: dict) -> None:
        kind = message.pop("type", "")
        m = self.manager
        if kind == protocol.WORKER_STARTED:
            m.emit(self.job.id, "worker_started", message, blas=message.get("blas", ""),
                   device=message.get("device", ""), total_steps=message.get("total_steps", 0),
                   truncated_examples=message.get("truncated_examples", 0),
                   step=message.get("resumed_from_step", 0))
        elif kind == protocol.STEP:
            m.emit(self.job.id, "step", message, step=message["step"], loss=message["loss"],
                   total_steps=message["total_steps"],
                   skipped_steps=message.get("skipped_steps", 0))
        elif kind == protocol.EVAL:
            m.emit(self.job.id, "eval", message, eval_loss=message["eval_loss"])
        elif kind == protocol.CHECKPOINT_SAVED:
            job = m.get(self.job.id)
            m.emit(self.job.id, "checkpoint_saved", message,
                   checkpoints=job.checkpoints + [message["checkpoint"]],
                   resume_checkpoint=message["checkpoint"])
        elif kind == protocol.FINISHED:
            # The final checkpoint is in the store: the job has succeeded, even
            # if the process takes a moment longer to exit.
            self._finished = message
            self.manager.set_state(self.job.id, SUCCEEDED, "training finished",
                                   output_checkpoint=message["output_checkpoint"])
        elif kind == protocol.FAILED:
            self._failure = message
        else:
            log.warning("job %s: unknown report %r", self.job.id, kind)

    def _finish(self, returncode: int) -> None:
        m, job_id = self.manager, self.job.id
        if self._finished is not None:
            return  # already SUCCEEDED
        if self._cancel_requested:
            m.set_state(job_id, CANCELLED, "cancelled by request")
        elif self._stop_requested:
            m.set_state(job_id, INTERRUPTED, "the server is shutting down",
                        error=("SERVER_SHUTDOWN", "the server stopped the job; "
                               "ResumeTrainingJob continues from the last saved checkpoint"))
        elif self._failure is not None:
            m.set_state(job_id, FAILED, "training failed",
                        error=(self._failure.get("reason", "TRAINING_FAILED"),
                               self._failure.get("message", "")))
        else:
            m.set_state(job_id, FAILED, "the worker process died",
                        error=("WORKER_CRASHED", self._crash_message(returncode)))

    def _crash_message(self, returncode: int) -> str:
        if returncode < 0:
            name = signal.Signals(-returncode).name
            cause = " (killed: out of memory, or by an operator)" if name == "SIGKILL" else ""
            what = f"the worker was killed by {name}{cause}"
        else:
            what = f"the worker exited with status {returncode} without finishing"
        tail = _tail(self.log_path)
        return f"{what}; last log lines:\n{tail}" if tail else what


def _tail(path: Path, lines: int = 8, max_bytes: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])

"""Jobs: create, queue, run one worker process per job, cancel, resume, recover.

The manager owns the job lifecycle; the worker process does the MLX work
and reports over a pipe (see ``mlxtune.jobs.protocol``). Every report becomes
a stored event first and a notification second, so watchers never miss one.
A worker that crashes, is killed or runs out of memory only ends its own job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from mlxtune.errors import FailedPrecondition, NotFound
from mlxtune.jobs.db import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    INTERRUPTED,
    QUEUED,
    RESUMABLE_STATES,
    RUNNING,
    EventRecord,
    JobDB,
    JobRecord,
)
from mlxtune.jobs.runner import WorkerRunner

log = logging.getLogger(__name__)


class JobManager:
    def __init__(self, db: JobDB, state_dir: str | Path, worker_spec: Callable[[JobRecord], dict],
                 *, max_concurrent: int = 1, on_event: Callable[[JobRecord, EventRecord], None]
                 | None = None, worker_env: dict | None = None) -> None:
        self.db = db
        self.state_dir = Path(state_dir)
        self.worker_spec = worker_spec
        self.max_concurrent = max(1, max_concurrent)
        self.on_event = on_event
        self.worker_env = worker_env or {}
        self._changed = threading.Condition()
        self._runners: dict[str, WorkerRunner] = {}
        self._stopping = False
        self._dispatching = True
        self._dispatcher: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        """Mark jobs a previous server left running as interrupted, then dispatch."""
        for job in self.db.jobs((RUNNING,)):
            self.set_state(job.id, INTERRUPTED, "the server stopped while the job was running",
                           error=("SERVER_RESTARTED", "the server restarted during training; "
                                  "ResumeTrainingJob continues from the last saved checkpoint"))
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="job-dispatcher",
                                            daemon=True)
        self._dispatcher.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Ask running workers to save and stop; jobs end INTERRUPTED, resumable."""
        with self._changed:
            self._dispatching = False  # start no new workers
            self._changed.notify_all()
        runners = list(self._runners.values())
        for runner in runners:
            runner.request_stop(save=True)
        deadline = time.monotonic() + grace_seconds
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
            runner.kill()
            runner.join(2.0)
        # Only now end the event streams: they have seen every job's last state.
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    # -- jobs ---------------------------------------------------------------

    def create(self, job: JobRecord) -> tuple[JobRecord, bool]:
        """Queue a job; (job, created). A repeated request_id returns the first job."""
        job.queue_order = job.create_time
        stored = self.db.insert_job(job)
        if stored is not job:
            return stored, False
        self.emit(job.id, "state_change", {"state": QUEUED, "reason": "created",
                                           "queue_position": self.queue_position(job.id)})
        return self.get(job.id), True

    def get(self, job_id: str) -> JobRecord:
        job = self.db.get_job(job_id)
        if job is None:
            raise NotFound(message=f"job jobs/{job_id} not found", reason="JOB_NOT_FOUND",
                           metadata={"job": f"jobs/{job_id}"})
        return job

    def queue_position(self, job_id: str) -> int:
        for i, job in enumerate(self.db.queued_in_order(), start=1):
            if job.id == job_id:
                return i
        return 0

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state in FINAL_STATES + (INTERRUPTED,):
            if job.state == CANCELLED:
                return job
            raise FailedPrecondition(message=f"job {job.name} already ended ({job.state})",
                                     reason="JOB_ALREADY_ENDED")
        runner = self._runners.get(job_id)
        if runner is not None:
            runner.request_cancel()
        else:
            self.set_state(job_id, CANCELLED, "cancelled while queued")
        return self.get(job_id)

    def resume(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state not in RESUMABLE_STATES:
            raise FailedPrecondition(
                message=f"job {job.name} is {job.state}; only interrupted, failed or "
                "cancelled jobs can be resumed", reason="JOB_NOT_RESUMABLE")
        where = (f"from {job.resume_checkpoint} (step {job.step})" if job.resume_checkpoint
                 else "from the start (no checkpoint was saved)")
        self.db.update_job(job_id, queue_order=time.time(), error_reason="", error_message="",
                           end_time=None)
        self.set_state(job_id, QUEUED, f"resumed {where}")
        return self.get(job_id)

    # -- events -------------------------------------------------------------

    def emit(self, job_id: str, kind: str, payload: dict, **changes) -> EventRecord:
        event = self.db.append_event(job_id, kind, payload, changes)
        with self._changed:
            self._changed.notify_all()
        if self.on_event is not None:
            try:
                self.on_event(self.get(job_id), event)
            except Exception:  # noqa: BLE001 - metrics must never break a job
                log.exception("event hook failed")
        return event

    def set_state(self, job_id: str, state: str, reason: str,
                  error: tuple[str, str] | None = None, **changes) -> EventRecord:
        payload = {"state": state, "reason": reason}
        if error:
            payload["error"] = {"reason": error[0], "message": error[1]}
            changes.update(error_reason=error[0], error_message=error[1])
        if state == QUEUED:
            # Store the state first: the position counts the job among the queued.
            self.db.update_job(job_id, state=QUEUED, **changes)
            payload["queue_position"] = self.queue_position(job_id)
        if state in FINAL_STATES + (INTERRUPTED,):
            changes.setdefault("end_time", time.time())
        return self.emit(job_id, "state_change", payload, state=state, **changes)

    def wait_for_events(self, job_id: str, after: int, timeout: float) -> list[EventRecord]:
        """Events after `after`, waiting up to `timeout` seconds for the first one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                events = self.db.events_after(job_id, after)
                remaining = deadline - time.monotonic()
                if events or remaining <= 0 or self._stopping:
                    return events
                self._changed.wait(remaining)

    # -- dispatching --------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._changed:
                # Workers ask the kernel to kill them when the thread that
                # started them ends (PR_SET_PDEATHSIG is per thread), so this
                # thread lives until every worker has stopped.
                if self._stopping:
                    return
                self._runners = {k: r for k, r in self._runners.items() if r.alive}
                free = self.max_concurrent - len(self._runners)
                queued = self.db.queued_in_order()[:max(0, free)] if self._dispatching else []
                if not queued:
                    self._changed.wait(1.0)
                    continue
            for job in queued:
                self._start_worker(job)

    def _start_worker(self, job: JobRecord) -> None:
        job_dir = self.state_dir / "jobs" / job.id
        self.set_state(job.id, RUNNING, "a worker process started", start_time=time.time())
        try:
            runner = WorkerRunner(self, self.get(job.id), job_dir, self.worker_spec(job),
                                  self.worker_env)
            self._runners[job.id] = runner
            runner.start()
        except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint deleted while queued
            log.exception("could not start worker for %s", job.id)
            self._runners.pop(job.id, None)
            self.set_state(job.id, FAILED, "the worker could not start",
                           error=("WORKER_START_FAILED", str(exc)))


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]

"""The trainer service's core, plain Python: datasets, jobs and event streams.

The gRPC servicer converts messages and nothing else. MLX never runs in this
process: every job trains in a worker process of its own (see
``mlxtune.jobs``), so a crash, an out-of-memory kill or a NaN in one job
cannot take the server down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from mlxtune.data.dataset_store import (
    DatasetRecord,
    DatasetStore,
    UploadAssembler,
    parse_dataset_name,
    resolve_data_path,
)
from mlxtune.data.formats import DatasetFormat
from mlxtune.errors import InvalidArgument, NotFound
from mlxtune.jobs.db import STREAM_END_STATES, EventRecord, JobDB, JobRecord
from mlxtune.jobs.manager import JobManager, new_job_id
from mlxtune.store.checkpoints import CheckpointStore, parse_checkpoint_name
from mlxtune.store.paging import paginate
from mlxtune.store.requests import RequestLog, validate_request_id
from mlxtune.training.config import TrainingConfig

DEFAULT_HEARTBEAT_SECONDS = 5.0


@dataclass
class Heartbeat:
    """A keep-alive in an event stream; carries the latest stored sequence."""

    job: JobRecord
    queue_position: int


def parse_job_name(name: str, field: str = "name") -> str:
    job_id = name[len("jobs/"):] if name.startswith("jobs/") else name
    if not job_id or not all(c in "0123456789abcdef" for c in job_id) or len(job_id) > 32:
        raise InvalidArgument.field(field, f"{name!r} is not a job name like 'jobs/<id>'")
    return job_id


class TrainerCore:
    def __init__(self, store_root: str | Path, state_dir: str | Path | None = None, *,
                 data_root: str | Path | None = None, max_concurrent_jobs: int = 1,
                 worker_env: dict | None = None, on_event=None) -> None:
        self.store_root = Path(store_root)
        self.state_dir = Path(state_dir) if state_dir else self.store_root / "trainer"
        self.data_root = Path(data_root) if data_root else None
        self.checkpoints = CheckpointStore(self.store_root)
        self.datasets = DatasetStore(self.store_root)
        self.requests = RequestLog(self.store_root / "requests")
        self.db = JobDB(self.state_dir / "jobs.sqlite3")
        self.jobs = JobManager(self.db, self.state_dir, self._worker_spec,
                               max_concurrent=max_concurrent_jobs, worker_env=worker_env,
                               on_event=on_event)

    def start(self) -> None:
        self.jobs.start()

    def stop(self, grace_seconds: float = 10.0) -> None:
        self.jobs.stop(grace_seconds)

    # -- datasets -----------------------------------------------------------

    def upload_dataset(self, chunks: Iterable[bytes], fmt: DatasetFormat | None = None,
                       display_name: str = "", request_id: str = "") -> DatasetRecord:
        validate_request_id(request_id, "header.request_id")
        if (earlier := self.requests.lookup("dataset", request_id)) is not None:
            for _ in chunks:  # drain the stream: the client is still sending
                pass
            return self.get_dataset(earlier)
        with UploadAssembler(self.datasets) as upload:
            for chunk in chunks:
                upload.add(chunk)
            record = upload.commit(fmt, display_name=display_name, source="upload")
        self.requests.record("dataset", request_id, record.name)
        return record

    def create_dataset(self, path: str, fmt: DatasetFormat | None = None,
                       display_name: str = "", request_id: str = "") -> DatasetRecord:
        validate_request_id(request_id)
        if (earlier := self.requests.lookup("dataset", request_id)) is not None:
            return self.get_dataset(earlier)
        if self.data_root is None:
            raise InvalidArgument.field(
                "path", "this server has no data root (--data-root); upload the dataset instead")
        source = resolve_data_path(self.data_root, path)
        record = self.datasets.put_file(source, fmt, display_name=display_name, source=path)
        self.requests.record("dataset", request_id, record.name)
        return record

    def get_dataset(self, name: str, field: str = "name") -> DatasetRecord:
        return self.datasets.get(parse_dataset_name(name, field))

    def list_datasets(self, page_size: int = 0, page_token: str = ""):
        return self.datasets.list(page_size, page_token)

    # -- jobs ---------------------------------------------------------------

    def create_job(self, checkpoint: str, dataset: str, config: TrainingConfig, *,
                   validation_dataset: str = "", display_name: str = "",
                   request_id: str = "") -> tuple[JobRecord, bool]:
        validate_request_id(request_id)
        if request_id and (earlier := self.db.job_by_request_id(request_id)) is not None:
            return earlier, False
        checkpoint_id = parse_checkpoint_name(checkpoint, "checkpoint")
        if not self.checkpoints.exists(checkpoint_id):
            raise NotFound(message=f"checkpoint {checkpoint} not found", reason="CHECKPOINT_NOT_FOUND",
                           metadata={"field": "checkpoint"})
        train = self.get_dataset(dataset, "dataset")
        validation = self.get_dataset(validation_dataset, "validation_dataset") \
            if validation_dataset else None
        config.validate(num_train_examples=train.num_records)
        job = JobRecord(
            id=new_job_id(), checkpoint=checkpoint_id, dataset=train.id,
            validation_dataset=validation.id if validation else "",
            # The job shows the effective configuration, every default filled in.
            config=config.with_defaults().to_dict(), request_id=request_id or None, display_name=display_name)
        return self.jobs.create(job)

    def get_job(self, name: str) -> JobRecord:
        return self.jobs.get(parse_job_name(name))

    def list_jobs(self, page_size: int = 0, page_token: str = "",
                  states: tuple[str, ...] = ()) -> tuple[list[JobRecord], str]:
        return paginate(self.db.jobs(states), lambda j: (j.create_time, j.id), page_size,
                        page_token)

    def cancel_job(self, name: str) -> JobRecord:
        return self.jobs.cancel(parse_job_name(name))

    def resume_job(self, name: str) -> JobRecord:
        return self.jobs.resume(parse_job_name(name))

    def queue_position(self, job_id: str) -> int:
        return self.jobs.queue_position(job_id)

    def watch(self, name: str, after_sequence: int = 0,
              heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
              is_active=lambda: True) -> Iterator[EventRecord | Heartbeat]:
        """Stored events after `after_sequence`, then live ones; heartbeats in between.

        Ends after the job reaches a state its stream ends in, or when
        `is_active()` turns false (the client went away).
        """
        if after_sequence < 0:
            raise InvalidArgument.field("after_sequence", "must be >= 0")
        job_id = parse_job_name(name)
        job = self.jobs.get(job_id)
        after = after_sequence
        if job.state in STREAM_END_STATES and after >= job.last_sequence:
            return
        while is_active() and not self.jobs.stopping:
            events = self.jobs.wait_for_events(job_id, after, heartbeat_seconds)
            if not events:
                job = self.jobs.get(job_id)
                yield Heartbeat(job, self.queue_position(job_id))
                continue
            for event in events:
                after = event.sequence
                yield event
            job = self.jobs.get(job_id)
            if job.state in STREAM_END_STATES and after >= job.last_sequence:
                return

    # -- workers ------------------------------------------------------------

    def _worker_spec(self, job: JobRecord) -> dict:
        return {
            "job_id": job.id,
            "store_root": str(self.store_root),
            "checkpoint_id": job.checkpoint,
            "dataset_id": job.dataset,
            "validation_dataset_id": job.validation_dataset,
            "config": job.config,
            "resume_checkpoint_id": job.resume_checkpoint,
            "created": time.time(),
        }

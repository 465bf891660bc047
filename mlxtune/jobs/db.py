"""Persistent jobs and their event history, in SQLite.

Every job and every event is written before anyone is told about it, so a
client that reconnects, or a server that restarts, sees the full history.
One connection guarded by a lock serves all threads: the write rate (a few
events per training step) is far below what SQLite sustains, and a single
writer avoids "database is locked" retries.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
# States a job's stream ends in: final ones, and INTERRUPTED (until resumed).
STREAM_END_STATES = FINAL_STATES + (INTERRUPTED,)
RESUMABLE_STATES = (INTERRUPTED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    checkpoint TEXT NOT NULL,
    dataset TEXT NOT NULL,
    validation_dataset TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    eval_loss REAL,
    output_checkpoint TEXT NOT NULL DEFAULT '',
    checkpoints TEXT NOT NULL DEFAULT '[]',
    error_reason TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    blas TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    skipped_steps INTEGER NOT NULL DEFAULT 0,
    truncated_examples INTEGER NOT NULL DEFAULT 0,
    last_sequence INTEGER NOT NULL DEFAULT 0,
    resume_checkpoint TEXT NOT NULL DEFAULT '',
    queue_order REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, queue_order);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
"""


@dataclass
class JobRecord:
    id: str
    checkpoint: str
    dataset: str
    config: dict
    state: str = QUEUED
    request_id: str | None = None
    display_name: str = ""
    validation_dataset: str = ""
    create_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    output_checkpoint: str = ""
    checkpoints: list[str] = field(default_factory=list)
    error_reason: str = ""
    error_message: str = ""
    blas: str = ""
    device: str = ""
    skipped_steps: int = 0
    truncated_examples: int = 0
    last_sequence: int = 0
    resume_checkpoint: str = ""
    queue_order: float = 0.0

    @property
    def name(self) -> str:
        return f"jobs/{self.id}"


@dataclass
class EventRecord:
    job_id: str
    sequence: int
    time: float
    kind: str
    payload: dict


_JSON_COLUMNS = ("config", "checkpoints")


class JobDB:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs ---------------------------------------------------------------

    def insert_job(self, job: JobRecord) -> JobRecord:
        """Insert; if the request_id exists, return the job it created instead."""
        row = _to_row(job)
        with self._lock:
            try:
                self._conn.execute(
                    f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()))
            except sqlite3.IntegrityError:
                existing = self.job_by_request_id(job.request_id) if job.request_id else None
                if existing is None:
                    raise
                return existing
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            return _from_row(cur, row) if row else None

    def job_by_request_id(self, request_id: str) -> JobRecord | None:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,))
            row = cur.fetchone()
            return _from_row(cur, row) if row else None

    def update_job(self, job_id: str, **changes) -> None:
        if not changes:
            return
        for key in _JSON_COLUMNS:
            if key in changes:
                changes[key] = json.dumps(changes[key])
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._lock:
            self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?",
                               [*changes.values(), job_id])

    def jobs(self, states: tuple[str, ...] = ()) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs", []
        if states:
            query += f" WHERE state IN ({', '.join('?' * len(states))})"
            args = list(states)
        with self._lock:
            cur = self._conn.execute(query + " ORDER BY create_time DESC, id DESC", args)
            return [_from_row(cur, row) for row in cur.fetchall()]

    def queued_in_order(self) -> list[JobRecord]:
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs WHERE state = ? ORDER BY queue_order, id", (QUEUED,))
            return [_from_row(cur, row) for row in cur.fetchall()]

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict(rows)

    # -- events -------------------------------------------------------------

    def append_event(self, job_id: str, kind: str, payload: dict,
                     job_changes: dict | None = None) -> EventRecord:
        """Store the next event of a job (and any job field changes) in one transaction."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self._conn.execute(
                    "SELECT last_sequence FROM jobs WHERE id = ?", (job_id,)).fetchone()
                seq = last + 1
                self._conn.execute(
                    "INSERT INTO events (job_id, sequence, time, kind, payload) VALUES (?,?,?,?,?)",
                    (job_id, seq, now, kind, json.dumps(payload)))
                changes = dict(job_changes or {}, last_sequence=seq)
                for key in _JSON_COLUMNS:
                    if key in changes:
                        changes[key] = json.dumps(changes[key])
                sets = ", ".join(f"{k} = ?" for k in changes)
                self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?",
                                   [*changes.values(), job_id])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return EventRecord(job_id, seq, now, kind, payload)

    def events_after(self, job_id: str, after: int, limit: int = 1000) -> list[EventRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT job_id, sequence, time, kind, payload FROM events "
                "WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after, limit)).fetchall()
        return [EventRecord(j, s, t, k, json.loads(p)) for j, s, t, k, p in rows]


def _to_row(job: JobRecord) -> dict:
    row = {f.name: getattr(job, f.name) for f in fields(JobRecord)}
    for key in _JSON_COLUMNS:
        row[key] = json.dumps(row[key])
    return row


def _from_row(cursor: sqlite3.Cursor, row: tuple) -> JobRecord:
    data = {d[0]: v for d, v in zip(cursor.description, row, strict=True)}
    for key in _JSON_COLUMNS:
        data[key] = json.loads(data[key])
    return JobRecord(**data)

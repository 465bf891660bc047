"""Training metrics (the gRPC metrics come from the shared interceptor).

Per-job gauges carry a ``job_id`` label (``job`` is Prometheus' own target
label): jobs are few and long, and a dashboard wants one loss curve per job.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from mlxtune.jobs.db import EventRecord, JobDB, JobRecord

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
ENDED = ("succeeded", "failed", "cancelled", "interrupted")
# Per-job series of this many ended jobs stay visible; older ones are dropped
# so the series count does not grow with every job ever run.
KEEP_ENDED_JOBS = 50
# A step takes milliseconds on a GPU with a tiny model, minutes on a CPU with a big one.
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self.loss = Gauge("mlxtune_trainer_loss", "Latest training loss of a job.", ["job_id"],
                          registry=registry)
        self.eval_loss = Gauge("mlxtune_trainer_eval_loss", "Latest validation loss of a job.",
                               ["job_id"], registry=registry)
        self.tokens_per_second = Gauge("mlxtune_trainer_tokens_per_second",
                                       "Tokens per second of a job's latest step.", ["job_id"],
                                       registry=registry)
        self.learning_rate = Gauge("mlxtune_trainer_learning_rate",
                                   "Learning rate of a job's latest step.", ["job_id"],
                                   registry=registry)
        self.peak_memory = Gauge("mlxtune_trainer_peak_memory_bytes",
                                 "Peak MLX memory of a job's worker.", ["job_id"], registry=registry)
        self.steps = Counter("mlxtune_trainer_steps", "Optimizer steps completed.",
                             registry=registry)
        self.skipped_steps = Counter("mlxtune_trainer_skipped_steps",
                                     "Steps skipped for non-finite loss or gradients.",
                                     registry=registry)
        self.trained_tokens = Counter("mlxtune_trainer_tokens",
                                      "Tokens processed by training steps.", registry=registry)
        self.step_seconds = Histogram("mlxtune_trainer_step_duration_seconds",
                                      "Wall time of one optimizer step.",
                                      buckets=_STEP_BUCKETS, registry=registry)
        self.failures = Counter("mlxtune_trainer_job_failures",
                                "Jobs that failed, by reason (e.g. WORKER_CRASHED, "
                                "NON_FINITE_LOSS).", ["reason"], registry=registry)
        for reason in ("WORKER_CRASHED", "NON_FINITE_LOSS", "TRAINING_ERROR"):
            self.failures.labels(reason=reason)
        self._per_job = (self.loss, self.eval_loss, self.tokens_per_second,
                         self.learning_rate, self.peak_memory)
        self._ended: list[str] = []

    def track_jobs(self, db: JobDB) -> None:
        """Jobs by state and the queue depth, read from the database at scrape time."""
        self.registry.register(_JobStateCollector(db))

    def on_event(self, job: JobRecord, event: EventRecord) -> None:
        p = event.payload
        if event.kind == "step":
            if p.get("skipped"):
                self.skipped_steps.inc()
                return
            self.steps.inc()
            self.loss.labels(job.id).set(p["loss"])
            self.tokens_per_second.labels(job.id).set(p["tokens_per_second"])
            self.learning_rate.labels(job.id).set(p["learning_rate"])
            self.peak_memory.labels(job.id).set(p["peak_memory_bytes"])
            self.step_seconds.observe(p["step_seconds"])
            self.trained_tokens.inc(p["tokens_per_second"] * p["step_seconds"])
        elif event.kind == "eval":
            self.eval_loss.labels(job.id).set(p["eval_loss"])
        elif event.kind == "state_change" and p.get("state") in ENDED:
            if p["state"] == "failed":
                self.failures.labels(reason=p.get("error", {}).get("reason", "UNKNOWN")).inc()
            self._forget_old_jobs(job.id)

    def _forget_old_jobs(self, ended_job: str) -> None:
        if ended_job in self._ended:
            self._ended.remove(ended_job)
        self._ended.append(ended_job)
        while len(self._ended) > KEEP_ENDED_JOBS:
            old = self._ended.pop(0)
            for gauge in self._per_job:
                try:
                    gauge.remove(old)
                except KeyError:
                    pass  # the job never reported this metric


class _JobStateCollector:
    def __init__(self, db: JobDB) -> None:
        self.db = db

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        counts = self.db.count_by_state()
        jobs = GaugeMetricFamily("mlxtune_trainer_jobs", "Jobs by state.", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("mlxtune_trainer_queue_depth", "Jobs waiting for a worker.",
                                value=counts.get("queued", 0))

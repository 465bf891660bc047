"""The training view: a live progress bar on a terminal, plain lines elsewhere.

Both read the same job events. Times come from the events themselves (not
from when they arrived), so re-watching a job from its start replays its
history correctly: elapsed counts from when the job started running, and
the ETA is the remaining steps times the recent step time.
"""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client.messages import STREAM_END_STATES, enum_short_name


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _state(state: int) -> str:
    return enum_short_name(trainer_pb.JobState.DESCRIPTOR, state)


class TrainingStats:
    """What the events told so far about a job's progress.

    ``eval_every_steps`` (from the job's config, when known) lets the ETA
    count the validation passes still to come, which can cost many steps each.
    """

    def __init__(self, eval_every_steps: int = 0) -> None:
        self.eval_every_steps = eval_every_steps
        self.last_eval_seconds = 0.0
        self.step = 0
        self.total_steps = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.first_eval_loss: float | None = None
        self.first_eval_step: int | None = None  # 0: validated before any update
        self.learning_rate: float | None = None
        self.tokens_per_second: float | None = None
        self.state = "queued"
        self.started_at: float | None = None  # event time of RUNNING
        self.ended_at: float | None = None  # event time of the final state
        self.recent_step_seconds: deque[float] = deque(maxlen=10)
        # Where the time went, for summaries.
        self.step_seconds_total = 0.0
        self.eval_seconds_total = 0.0
        self.evals = 0
        self.worker_started_at: float | None = None

    def update(self, event: trainer_pb.JobEvent) -> None:
        at = event.time.seconds + event.time.nanos / 1e9 if event.time.seconds else time.time()
        kind = event.WhichOneof("kind")
        if kind == "step":
            s = event.step
            self.step, self.total_steps = s.step, s.total_steps or self.total_steps
            if not s.skipped:
                self.loss = s.loss
            self.learning_rate, self.tokens_per_second = s.learning_rate, s.tokens_per_second
            self.recent_step_seconds.append(s.step_seconds)
            self.step_seconds_total += s.step_seconds
        elif kind == "eval":
            self.eval_loss = event.eval.eval_loss
            self.last_eval_seconds = event.eval.eval_seconds
            self.eval_seconds_total += event.eval.eval_seconds
            self.evals += 1
            if self.first_eval_loss is None:
                self.first_eval_loss, self.first_eval_step = self.eval_loss, event.eval.step
        elif kind == "worker_started":
            self.worker_started_at = at
            self.total_steps = event.worker_started.total_steps or self.total_steps
            self.step = max(self.step, event.worker_started.resumed_from_step)
        elif kind == "state_change":
            state = event.state_change.state
            self.state = _state(state)
            if state == trainer_pb.JOB_STATE_RUNNING:
                self.started_at, self.ended_at = self.started_at or at, None
            elif state in STREAM_END_STATES:
                self.ended_at = at

    def elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at

    def eta(self) -> float | None:
        if self.ended_at is not None:
            return 0.0
        if not self.recent_step_seconds or not self.total_steps:
            return None
        mean = sum(self.recent_step_seconds) / len(self.recent_step_seconds)
        return (self.total_steps - self.step) * mean + self._evals_left() * self.last_eval_seconds

    def _evals_left(self) -> int:
        every, total = self.eval_every_steps, self.total_steps
        if every <= 0:
            return 0
        # Validation runs at every multiple of eval_every_steps and after the last step.
        return total // every - self.step // every + (1 if total % every else 0)


class _StatsColumn(ProgressColumn):
    """Metrics and clocks, recomputed at every refresh so elapsed ticks between events."""

    def __init__(self, stats: TrainingStats) -> None:
        super().__init__()
        self.stats = stats

    def render(self, task) -> Text:
        s = self.stats
        parts = [
            f"loss {s.loss:.4f}" if s.loss is not None else "loss -",
            f"eval {s.eval_loss:.4f}" if s.eval_loss is not None else "eval -",
            f"lr {s.learning_rate:.2e}" if s.learning_rate is not None else "lr -",
            f"{s.tokens_per_second:,.0f} tok/s" if s.tokens_per_second else "- tok/s",
            f"elapsed {_clock(s.elapsed())}",
            f"eta {_clock(s.eta())}",
        ]
        return Text("  ".join(parts))


class TrainingView:
    """Shows a job's events; use as a context manager around the event loop."""

    def __init__(self, console: Console, *, live: bool | None = None,
                 job: trainer_pb.TrainingJob | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.stats = TrainingStats(job.config.eval_every_steps if job is not None else 0)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> TrainingView:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<9}"), BarColumn(bar_width=30),
                MofNCompleteColumn(), _StatsColumn(self.stats),
                console=self.console, refresh_per_second=4, transient=False)
            self._task = self._progress.add_task("queued", total=None)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, event: trainer_pb.JobEvent) -> None:
        self.stats.update(event)
        line = self._describe(event)
        if self._progress is not None:
            s = self.stats
            self._progress.update(self._task, description=s.state, completed=s.step,
                                  total=s.total_steps or None)
            if line and event.WhichOneof("kind") != "step":
                self._progress.console.print(line, markup=False, highlight=False)
        elif line:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _describe(self, event: trainer_pb.JobEvent) -> str:
        kind = event.WhichOneof("kind")
        s = self.stats
        if kind == "step":
            st = event.step
            return (f"step {st.step}/{st.total_steps}  loss {st.loss:.4f}"
                    + ("  (skipped: non-finite)" if st.skipped else "")
                    + f"  lr {st.learning_rate:.2e}  {st.tokens_per_second:,.0f} tok/s"
                    f"  elapsed {_clock(s.elapsed())}  eta {_clock(s.eta())}")
        if kind == "eval":
            return (f"step {event.eval.step}: eval loss {event.eval.eval_loss:.4f} "
                    f"({event.eval.eval_tokens} tokens, {event.eval.eval_seconds:.1f} s)")
        if kind == "checkpoint_saved":
            saved = event.checkpoint_saved
            return (f"step {saved.step}: saved {'final ' if saved.final else ''}"
                    f"checkpoint {saved.checkpoint}")
        if kind == "worker_started":
            w = event.worker_started
            resumed = f", resuming at step {w.resumed_from_step}" if w.resumed_from_step else ""
            return (f"worker started on {w.device} ({w.blas}): {w.train_examples} training / "
                    f"{w.validation_examples} validation examples, {w.total_steps} steps, "
                    f"{w.trainable_parameters:,} trainable parameters{resumed}"
                    + (f", {w.truncated_examples} truncated" if w.truncated_examples else ""))
        if kind == "state_change":
            change = event.state_change
            text = f"job {_state(change.state)}"
            if change.reason:
                text += f": {change.reason}"
            if change.error.reason:
                text += f" [{change.error.reason}] {change.error.message}"
            return text
        return ""

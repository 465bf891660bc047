"""A job's event stream that survives dropped connections.

WatchTrainingJob streams a job's stored events after a sequence number, and
every stored event has the next sequence number. So a client that remembers
the last sequence it handed out can reconnect after any failure (server
restart, proxy cut, network blip) and ask for exactly the events after it:
none is yielded twice and none is skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc

from mlxtune.trainer.v1 import trainer_service_pb2 as trainer_pb
from mlxtune_client.errors import MlxtuneClientError
from mlxtune_client.messages import STREAM_END_STATES
from mlxtune_client.retry import DEFAULT_BACKOFF, Backoff, is_transient

DEFAULT_HEARTBEAT_SECONDS = 5


class EventStream:
    """Iterates a job's events (``JobEvent`` messages), reconnecting as needed.

    Ends after the event that puts the job in a state its stream ends in
    (SUCCEEDED, FAILED, CANCELLED, INTERRUPTED); ``final_state`` then holds
    that state. Heartbeats are skipped unless ``include_heartbeats``.
    Raises :class:`MlxtuneClientError` for errors the server decided (e.g.
    NOT_FOUND) at once, and for connection failures only once reconnecting
    has failed for ``reconnect_timeout`` seconds in a row.
    """

    def __init__(self, stub, job: str, after_sequence: int = 0, *,
                 get_job: Callable[[str], trainer_pb.TrainingJob],
                 backoff: Backoff = DEFAULT_BACKOFF, reconnect_timeout: float = 120.0,
                 heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
                 idle_timeout: float | None = None, include_heartbeats: bool = False,
                 training_job: trainer_pb.TrainingJob | None = None) -> None:
        self.job = job
        self.training_job = training_job  # set by MlxtuneClient.train: the created job
        self.last_sequence = after_sequence
        self.final_state: int | None = None
        self.reconnects = 0
        self._stub = stub
        self._get_job = get_job
        self._backoff = backoff
        self._reconnect_timeout = reconnect_timeout
        self._heartbeat_seconds = heartbeat_seconds
        # The server sends a heartbeat every few seconds even when nothing
        # happens, so a long silence means a stalled connection (e.g. a proxy
        # that keeps TCP up but stopped forwarding): drop it and reconnect.
        self._idle_timeout = (4 * heartbeat_seconds + 10) if idle_timeout is None else idle_timeout
        self._include_heartbeats = include_heartbeats
        self._call = None
        self._closed = False
        self._events = self._run()

    def __iter__(self) -> Iterator[trainer_pb.JobEvent]:
        return self

    def __next__(self) -> trainer_pb.JobEvent:
        return next(self._events)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop watching (the job itself goes on)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        self._events.close()

    def wait(self) -> trainer_pb.TrainingJob:
        """Consume the remaining events; return the job as it ended."""
        for _ in self:
            pass
        return self._get_job(self.job)

    def _run(self) -> Iterator[trainer_pb.JobEvent]:
        attempt = 0
        failing_since: float | None = None
        while not self._closed:
            request = trainer_pb.WatchTrainingJobRequest(
                name=self.job, after_sequence=self.last_sequence,
                heartbeat_seconds=self._heartbeat_seconds)
            self._call = self._stub.WatchTrainingJob(request)
            watchdog = _IdleWatchdog(self._call, self._idle_timeout)
            try:
                for response in self._call:
                    watchdog.reset()
                    attempt, failing_since = 0, None
                    event = response.event
                    if event.HasField("heartbeat"):
                        if self._include_heartbeats:
                            yield event
                        continue
                    if event.sequence <= self.last_sequence:
                        continue  # already handed out before a reconnect
                    self.last_sequence = event.sequence
                    if event.HasField("state_change"):
                        state = event.state_change.state
                        # A resumed job streams on past an INTERRUPTED event.
                        self.final_state = state if state in STREAM_END_STATES else None
                    yield event
                failure = "the stream ended before the job did"
            except grpc.RpcError as error:
                if self._closed:
                    return
                if not (watchdog.fired or is_transient(error)):
                    raise MlxtuneClientError.from_rpc_error(error) from None
                failure = (f"no message for {self._idle_timeout:g} s" if watchdog.fired
                           else f"{error.code().name}: {error.details()}")
            finally:
                watchdog.stop()
            if self.final_state is not None or self._ended_already():
                return
            # Retry transient failures, but give up on a server that stays away.
            attempt += 1
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > self._reconnect_timeout:
                raise MlxtuneClientError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"lost the event stream of {self.job} and could not resume it for "
                    f"{self._reconnect_timeout:g} s (last: {failure}); the job may still be "
                    f"running: watch it again after sequence {self.last_sequence}",
                    reason="STREAM_LOST")
            self.reconnects += 1
            time.sleep(self._backoff.delay(attempt))

    def _ended_already(self) -> bool:
        """After a stream ended without a final event: was there nothing left?

        That happens when watching a finished job from its last sequence. A
        server that shuts down also ends streams cleanly, even of queued jobs;
        those must be resumed, so ask rather than assume.
        """
        try:
            job = self._get_job(self.job)
        except MlxtuneClientError as error:
            if error.code == grpc.StatusCode.UNAVAILABLE:
                return False  # the server is away: reconnect with backoff
            raise
        if job.state in STREAM_END_STATES and job.last_sequence <= self.last_sequence:
            self.final_state = job.state
            return True
        return False


class _IdleWatchdog:
    """Cancels ``call`` when no message arrived for ``timeout`` seconds (0: never)."""

    def __init__(self, call, timeout: float) -> None:
        self.fired = False
        self._call = call
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._stopped = threading.Event()
        if timeout > 0:
            threading.Thread(target=self._run, name="mlxtune-watchdog", daemon=True).start()

    def reset(self) -> None:
        self._deadline = time.monotonic() + self._timeout

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(max(0.05, min(1.0, self._deadline - time.monotonic()))):
            if time.monotonic() >= self._deadline:
                self.fired = True
                self._call.cancel()
                return

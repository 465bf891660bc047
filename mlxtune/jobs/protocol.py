"""The worker → server report protocol: one JSON object per stdout line.

Each report has a "type"; the other keys are the fields of the matching
event (see JobEvent in trainer_service.proto). Commands go the other way on
stdin, one word per line.
"""

from __future__ import annotations

import json
import sys
import threading

WORKER_STARTED = "worker_started"
STEP = "step"
EVAL = "eval"
CHECKPOINT_SAVED = "checkpoint_saved"
FINISHED = "finished"  # {"output_checkpoint": id}
FAILED = "failed"  # {"reason": str, "message": str}

CANCEL = "cancel"
SAVE_AND_STOP = "save-and-stop"


class Reporter:
    """Writes reports to the real stdout; libraries' prints go to stderr instead."""

    def __init__(self) -> None:
        self._out = sys.stdout
        sys.stdout = sys.stderr  # keep stray prints out of the report stream
        self._lock = threading.Lock()

    def report(self, kind: str, **fields) -> None:
        line = json.dumps({"type": kind, **fields})
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class Commands:
    """Reads commands from stdin in a thread; EOF means the server is gone."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.save_and_stop = threading.Event()
        thread = threading.Thread(target=self._read, name="commands", daemon=True)
        thread.start()

    def _read(self) -> None:
        for line in sys.stdin:
            word = line.strip()
            if word == CANCEL:
                self.cancelled.set()
            elif word == SAVE_AND_STOP:
                self.save_and_stop.set()
        # The server closed the pipe (it died): save what we have and stop.
        self.save_and_stop.set()

    @property
    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.save_and_stop.is_set()

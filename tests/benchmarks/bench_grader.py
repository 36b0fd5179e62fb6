"""Code grader throughput: sandboxed programs graded per second, serial vs parallel, side by side.

Each program is a (correct or wrong) Python solution of a small stdin task with 3 tests, so a
correct one costs 3 sandboxed runs and a wrong one stops at its first failing test. The
serial and parallel modes are run alternately ``--repeats`` times in one process and the
medians compared. Prints ONE JSON line.

    python tests/benchmarks/bench_grader.py [--programs 48] [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lopd.eval.code_grader import CodeJob, CodeTest, grade_code_batch  # noqa: E402
from lopd.eval.sandbox import SandboxLimits, capabilities  # noqa: E402

CORRECT = "n = int(input())\nprint(sum(i * i for i in range(n)))\n"
WRONG = "n = int(input())\nprint(sum(i for i in range(n)))\n"
TESTS = [CodeTest(f"{n}\n", f"{sum(i * i for i in range(n))}\n") for n in (10, 1000, 100000)]


def jobs(n: int) -> list[CodeJob]:
    lim = SandboxLimits(wall_s=5, cpu_s=5, memory_mb=512)
    return [CodeJob(f"```python\n{CORRECT if i % 4 else WRONG}```", TESTS, limits=lim) for i in range(n)]


def run(batch: list[CodeJob], workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    verdicts = grade_code_batch(batch, workers=workers)
    dt = time.perf_counter() - t0
    expected = sum(1 for i in range(len(batch)) if i % 4)
    got = sum(v.correct for v in verdicts)
    if got != expected:
        raise SystemExit(f"grading is wrong: {got} correct, expected {expected}")
    return dt, sum(v.passed + (not v.correct) for v in verdicts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=48)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    batch = jobs(args.programs)
    serial, parallel, runs = [], [], 0
    for _ in range(args.repeats):
        dt, runs = run(batch, 1)
        serial.append(dt)
        dt, _ = run(batch, args.workers)
        parallel.append(dt)
    s, p = statistics.median(serial), statistics.median(parallel)
    print(json.dumps({
        "bench": "grader", "programs": args.programs, "sandboxed_runs_per_pass": runs, "workers": args.workers,
        "cpus": os.cpu_count(), "repeats": args.repeats, "isolation": capabilities(),
        "serial_s_median": round(s, 3), "parallel_s_median": round(p, 3),
        "serial_programs_per_s": round(args.programs / s, 2), "parallel_programs_per_s": round(args.programs / p, 2),
        "speedup": round(s / p, 2), "ms_per_sandboxed_run_serial": round(1000 * s / runs, 1),
    }))


if __name__ == "__main__":
    main()

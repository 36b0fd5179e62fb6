"""Code grading: run the response's program against the tests in the sandbox, LiveCodeBench's rules.

The program is the last fenced code block after the reasoning. It runs once per sample, all
tests in one sandboxed child (:mod:`lopd.eval.sandbox`) under LiveCodeBench's execution and
comparison rules (:mod:`lopd.eval.lcb`): its import prelude, stdin or functional mode
(functional when the problem has a ``func_name``), per-test timeout ``limits.wall_s``, a global
timeout of ``(timeout + 1) · tests + 5`` s, exact-or-``Decimal`` line comparison. The first
failing test's status is the sample's verdict. Samples are graded in parallel worker
processes (``spawn``: nothing of the caller, e.g. an inference engine, is inherited).
"""

from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from lopd.eval import lcb
from lopd.eval.interpreter import python_argv
from lopd.eval.lcb import functional_matches, stdout_matches  # noqa: F401 - the comparison, re-exported
from lopd.eval.math_grader import strip_reasoning
from lopd.eval.reaper import enable_subreaper
from lopd.eval.sandbox import SandboxLimits, run_program

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)
MAX_RUN_OUTPUT = 256 << 20
"""Most bytes one run (all tests together) may write to the grader."""


@dataclass
class CodeTest:
    input: str
    output: str
    testtype: str = "stdin"
    """stdin | functional (informational: the mode follows ``func_name``, as in LiveCodeBench)."""


@dataclass
class CodeJob:
    response: str
    tests: list[CodeTest]
    func_name: str | None = None
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    """``wall_s``: the per-test timeout; ``output_bytes``: the most one test may print; the run's
    own wall-clock and CPU limits are LiveCodeBench's global timeout."""


@dataclass
class CodeVerdict:
    correct: bool
    extracted: str | None
    """The program that was run; None when the response held no code."""
    verdict: str
    """correct | no_code | wrong_answer | exit (runtime error) | signal | timeout | cpu_limit | memory_limit |
    output_limit."""
    passed: int = 0
    total: int = 0
    detail: str = ""


def extract_code(response: str) -> str | None:
    """The last fenced code block after the reasoning (``python`` blocks preferred), or None."""
    tail = strip_reasoning(response)
    if tail is None:
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(tail)]
    py = [b for lang, b in blocks if lang in ("python", "py", "python3")]
    chosen = (py or [b for _, b in blocks] or [None])[-1]
    return chosen if chosen and chosen.strip() else None


def run_tests(code: str, tests: list[CodeTest], func_name: str | None, limits: SandboxLimits) -> list[lcb.TestOutcome]:
    """Run ``code`` on ``tests`` under LiveCodeBench's rules; outcomes up to the first failure."""
    if not tests:
        return []
    mode = "functional" if func_name else "stdin"
    n, timeout = len(tests), limits.wall_s
    files = lcb.job_files(code, mode, func_name, [t.input for t in tests], timeout, limits.output_bytes)
    run_limits = replace(limits, wall_s=lcb.global_timeout_s(timeout, n), cpu_s=lcb.cpu_budget_s(timeout, n),
                         output_bytes=min(MAX_RUN_OUTPUT, limits.output_bytes * n + (1 << 16)))
    r = run_program(python_argv("main.py"), limits=run_limits, files=files)
    return lcb.outcomes(r.status, r.stdout, r.stderr, mode, [t.output for t in tests])


def grade_code(job: CodeJob) -> CodeVerdict:
    """Run the response's program on the tests; the first failing test gives the verdict."""
    code = extract_code(job.response)
    total = len(job.tests)
    if code is None:
        return CodeVerdict(False, None, "no_code", 0, total)
    res = run_tests(code, job.tests, job.func_name, job.limits)
    passed = sum(o.status == "passed" for o in res)
    if passed == total:
        return CodeVerdict(True, code, "correct", total, total)
    bad = res[-1]
    return CodeVerdict(False, code, bad.status, passed, total, bad.detail)


def _init_worker() -> None:
    enable_subreaper()


def grade_code_batch(jobs: list[CodeJob], workers: int = 1, progress=None) -> list[CodeVerdict]:
    """Grade ``jobs`` in ``workers`` processes (results in input order); ``progress(n)`` per result."""
    if not jobs:
        return []
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out: list[CodeVerdict] = []
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_init_worker) as ex:
        for v in ex.map(grade_code, jobs, chunksize=1):
            out.append(v)
            if progress:
                progress(1)
    return out

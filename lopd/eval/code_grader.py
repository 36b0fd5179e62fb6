"""Code grading: run the response's program against the tests in the sandbox, in parallel.

LiveCodeBench's two test formats:

- ``stdin``: the program reads the test input on stdin; its stdout must equal the expected
  output line by line (trailing whitespace ignored; numbers compared with a 1e-6 tolerance).
- ``functional``: LeetCode style; the program defines ``class Solution`` with method
  ``func_name`` (or a top-level function of that name). Each input line is one JSON
  argument; the JSON of the return value must equal the expected JSON.

Each (program, test) runs in its own sandboxed process (:mod:`lopd.eval.sandbox`); grading
stops at the first failing test, whose status is the sample's verdict. Samples are graded
in parallel worker processes (``spawn``: nothing of the caller, e.g. an inference engine,
is inherited).
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from lopd.eval.interpreter import python_argv
from lopd.eval.math_grader import strip_reasoning
from lopd.eval.reaper import enable_subreaper
from lopd.eval.sandbox import SandboxLimits, run_program

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)

FUNCTIONAL_DRIVER = """\
import json, sys
_ns = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), _ns)
_args = [json.loads(line) for line in sys.stdin.read().splitlines() if line.strip()]
_fn = _ns["Solution"]().%(f)s if "Solution" in _ns else _ns["%(f)s"]
print(json.dumps(_fn(*_args)))
"""


@dataclass
class CodeTest:
    input: str
    output: str
    testtype: str = "stdin"
    """stdin | functional"""


@dataclass
class CodeJob:
    response: str
    tests: list[CodeTest]
    func_name: str | None = None
    limits: SandboxLimits = field(default_factory=SandboxLimits)


@dataclass
class CodeVerdict:
    correct: bool
    extracted: str | None
    """The program that was run; None when the response held no code."""
    verdict: str
    """correct | no_code | wrong_answer | exit | signal | timeout | cpu_limit | memory_limit | output_limit."""
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


def _num(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def stdout_matches(expected: str, got: str) -> bool:
    """LiveCodeBench-style output comparison (line by line, numeric tokens with tolerance)."""
    exp = [ln.rstrip() for ln in expected.strip().splitlines()]
    out = [ln.rstrip() for ln in got.strip().splitlines()]
    if exp == out:
        return True
    if len(exp) != len(out):
        return False
    for e, o in zip(exp, out, strict=True):
        et, ot = e.split(), o.split()
        if len(et) != len(ot):
            return False
        for a, b in zip(et, ot, strict=True):
            if a == b:
                continue
            x, y = _num(a), _num(b)
            if x is None or y is None or not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6):
                return False
    return True


def functional_matches(expected: str, got: str) -> bool:
    lines = got.strip().splitlines()
    try:
        return bool(lines) and json.loads(lines[-1]) == json.loads(expected)
    except (json.JSONDecodeError, ValueError):
        return False


def grade_code(job: CodeJob) -> CodeVerdict:
    """Run the response's program on each test until one fails."""
    code = extract_code(job.response)
    total = len(job.tests)
    if code is None:
        return CodeVerdict(False, None, "no_code", 0, total)
    for i, t in enumerate(job.tests):
        if t.testtype == "functional":
            if not job.func_name:
                return CodeVerdict(False, code, "exit", i, total, "functional test without func_name")
            files = {"main.py": (FUNCTIONAL_DRIVER % {"f": job.func_name}).encode(), "solution.py": code.encode()}
        else:
            files = {"main.py": code.encode()}
        r = run_program(python_argv("main.py"), stdin=t.input.encode(), limits=job.limits, files=files)
        if r.status != "ok":
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return CodeVerdict(False, code, r.status, i, total, f"test {i}: {tail[0][:200]}")
        out = r.stdout.decode(errors="replace")
        ok = functional_matches(t.output, out) if t.testtype == "functional" else stdout_matches(t.output, out)
        if not ok:
            return CodeVerdict(False, code, "wrong_answer", i, total, f"test {i}: output differs")
    return CodeVerdict(True, code, "correct", total, total)


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

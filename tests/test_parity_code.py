"""Code grading parity with LiveCodeBench: lopd's sandboxed grader against LiveCodeBench's own verdicts.

The table ``tests/fixtures/parity/code_parity.json`` was produced by ``tools/lcb_parity.py``,
which runs every case through LiveCodeBench's ``testing_util.run_test`` (docs/eval.md says how
to rerun it). All cases are graded once, in parallel, by lopd's grader; each case is then one
test.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from lopd.eval.code_grader import CodeJob, CodeTest, grade_code_batch
from lopd.eval.lcb import PRELUDE
from lopd.eval.sandbox import SandboxLimits

TABLE = json.loads((Path(__file__).parent / "fixtures" / "parity" / "code_parity.json").read_text())
CASES = {c["id"]: c for c in TABLE["cases"]}
FAILURES = {-1: {"timeout", "cpu_limit", "signal", "exit", "memory_limit", "output_limit"},
            -2: {"wrong_answer"}, False: {"wrong_answer"}, -3: {"timeout"}, -4: {"exit", "memory_limit"}}


def _job(case: dict) -> CodeJob:
    tests = [CodeTest(t["input"], t["output"], case["mode"]) for t in case["tests"]]
    return CodeJob(f"```python\n{case['code']}\n```", tests, case["func_name"],
                   SandboxLimits(wall_s=case["timeout_s"], memory_mb=1024))


@pytest.fixture(scope="module")
def lopd_verdicts():
    t0 = time.monotonic()
    got = grade_code_batch([_job(c) for c in CASES.values()], workers=4)
    print(f"graded {len(CASES)} parity cases in {time.monotonic() - t0:.1f} s")
    return dict(zip(CASES, got, strict=True))


def test_parity_table_is_large_enough():
    assert hashlib.sha256(PRELUDE.encode()).hexdigest() == TABLE["import_string_sha256"]
    modes = {c["mode"] for c in CASES.values()}
    assert len(CASES) >= 60 and modes == {"stdin", "functional"}
    assert {c["lcb"]["passed"] for c in CASES.values()} == {True, False}


@pytest.mark.parametrize("case_id", list(CASES))
def test_parity_code(case_id, lopd_verdicts):
    case, got = CASES[case_id], lopd_verdicts[case_id]
    ref = case["lcb"]
    assert got.correct == ref["passed"], (case_id, ref, got)
    if ref["passed"]:
        assert got.verdict == "correct" and got.passed == len(case["tests"])
    else:
        assert got.verdict in FAILURES[ref["first_failure"]], (case_id, ref, got)
        assert got.passed == sum(r is True for r in ref["results"]), (case_id, ref, got)

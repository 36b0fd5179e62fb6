"""Math grading parity: lopd's grader against the reference verdicts of math-verify's documented use.

The table ``tests/fixtures/parity/math_parity.json`` was produced by ``tools/math_parity.py``
(``verify(parse("$gold$"), parse(response))`` on the whole response). Where lopd's extraction
rule deliberately differs (last ``\\boxed{}`` after ``</think>`` only), the case names the
reason, docs/eval.md explains it, and the test checks that the difference is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lopd.eval.math_grader import grade_math

ROOT = Path(__file__).resolve().parent.parent
TABLE = json.loads((ROOT / "tests" / "fixtures" / "parity" / "math_parity.json").read_text())
CASES = {c["id"]: c for c in TABLE["cases"]}
DOCS = (ROOT / "docs" / "eval.md").read_text()


def test_parity_math_table_is_large_enough():
    assert len(CASES) >= 60
    assert {c["reference"] for c in CASES.values()} == {True, False}
    agree = sum(c["documented_difference"] is None for c in CASES.values())
    assert agree / len(CASES) > 0.8


@pytest.mark.parametrize("case_id", list(CASES))
def test_parity_math(case_id):
    case = CASES[case_id]
    got = grade_math(case["response"], case["gold"])
    reason = case["documented_difference"]
    if reason is None:
        assert got.correct == case["reference"], (case_id, got, case["reference_extracted"])
    else:
        assert f"`{reason}`" in DOCS, f"difference {reason!r} is not explained in docs/eval.md"
        assert got.correct != case["reference"], (case_id, got)

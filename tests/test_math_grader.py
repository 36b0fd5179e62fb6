"""Math grading: final \\boxed{} after the reasoning, math-verify equivalence, verdicts."""

from __future__ import annotations

import pytest

from lopd.eval.math_grader import MathGradeError, extract_answer, grade_math, last_boxed

# (response, gold answer, expected correct, expected verdict)
CASES = [
    # fractions vs decimals, LaTeX forms
    ("The answer is \\boxed{0.5}", "1/2", True, "correct"),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, "correct"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34", True, "correct"),
    ("\\boxed{0.3333}", "1/3", False, "wrong"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True, "correct"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "correct"),
    ("\\boxed{2^{10}}", "1024", True, "correct"),
    ("\\boxed{\\frac{\\pi}{3}}", "\\pi/3", True, "correct"),
    ("\\boxed{3.14}", "\\pi", False, "wrong"),
    ("\\boxed{1,000}", "1000", True, "correct"),
    ("\\boxed{025}", "25", True, "correct"),
    ("\\boxed{-7}", "7", False, "wrong"),
    ("\\boxed{50\\%}", "\\frac12", True, "correct"),
    ("\\boxed{x = 5}", "5", True, "correct"),
    ("\\fbox{12}", "12", True, "correct"),
    # sets and tuples
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True, "correct"),
    ("\\boxed{(1, 2)}", "(1,2)", True, "correct"),
    ("\\boxed{(2, 1)}", "(1,2)", False, "wrong"),
    # units and degrees
    ("so \\boxed{5\\text{ cm}}", "5", True, "correct"),
    ("\\boxed{30^\\circ}", "30", True, "correct"),
    ("\\boxed{12 \\text{ dollars}}", "12", True, "correct"),
    # multiple boxed answers: the last one counts
    ("First \\boxed{1}, on reflection \\boxed{2}", "2", True, "correct"),
    ("First \\boxed{1}, on reflection \\boxed{2}", "1", False, "wrong"),
    # no boxed answer / empty / unbalanced
    ("no box: the answer is 42", "42", False, "no_answer"),
    ("\\boxed{}", "1", False, "no_answer"),
    ("\\boxed{\\frac{1}{3}", "1/3", False, "no_answer"),
    # the reasoning section
    ("<think>it is \\boxed{7}</think> I am confident it is 7", "7", False, "no_answer"),
    ("<think>so \\boxed{7} and then I ran out of tokens", "7", False, "unthinking"),
    ("<think>hmm \\boxed{3}</think>Final: \\boxed{7}", "7", True, "correct"),
    ("<think>a</think><think>b \\boxed{1}</think>\\boxed{9}", "9", True, "correct"),
    # unparseable
    ("\\boxed{@#!}", "1", False, "unparseable"),
    # nested braces
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", True, "correct"),
]


@pytest.mark.parametrize("response,answer,correct,verdict", CASES)
def test_grade(response, answer, correct, verdict):
    v = grade_math(response, answer)
    assert (v.correct, v.verdict) == (correct, verdict), v


def test_at_least_25_cases():
    assert len(CASES) >= 25


def test_extraction_details():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_answer("<think>x</think>\\boxed{3}") == ("3", "ok")
    assert extract_answer("<think>\\boxed{3}") == (None, "unthinking")


def test_gold_is_boxed_or_plain():
    assert grade_math("\\boxed{4}", "\\boxed{4}").correct
    assert grade_math("\\boxed{4}", "$4$").correct


def test_unparseable_gold_is_an_error():
    with pytest.raises(MathGradeError, match="gold answer"):
        grade_math("\\boxed{4}", "@#!")

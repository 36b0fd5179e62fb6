"""Math grading: the final ``\\boxed{}`` answer after the reasoning, checked with math-verify.

Rules (the paper's protocol for AIME / HMMT):

1. The reasoning section is dropped: everything up to the last ``</think>``. A response that
   opens ``<think>`` and never closes it was cut off while thinking: it has no answer.
2. The answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) of what
   remains, braces matched (nested braces allowed). No box means no answer.
3. Equivalence is math-verify's (sympy): ``1/2`` = ``0.5`` = ``\\frac{1}{2}``, units and
   ``^\\circ`` are normalised away; never a string match.
4. Anything unparseable is wrong, and the verdict says why (``no_answer``, ``unparseable``).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from lopd import LopdError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout notices are not for users
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
MATH_RULES = {"extraction": "last \\boxed{} / \\fbox{} after the last </think>; none inside an unclosed <think>",
              "equivalence": "math-verify verify(gold, answer), LaTeX and plain expressions",
              "harness": "the last-boxed rule of Qwen2.5-Math's evaluation, checked with math-verify"}
"""The math grading rules in force, for reports."""


class MathGradeError(LopdError):
    """A gold answer that math-verify cannot parse (a dataset problem, not a model one)."""


@dataclass(frozen=True)
class MathVerdict:
    correct: bool
    extracted: str | None
    """The boxed content that was graded; None when there was no answer to extract."""
    verdict: str
    """correct | wrong | no_answer | unthinking (cut off inside <think>) | unparseable."""


def strip_reasoning(response: str) -> str | None:
    """The part of ``response`` after the reasoning section; None if it never left ``<think>``."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response:
        return None
    return response


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (braces matched), or None."""
    found = None
    for m in _BOX_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1].strip()
    return found


def extract_answer(response: str) -> tuple[str | None, str]:
    """(boxed answer, reason) — reason is ``ok``, ``unthinking`` or ``no_answer``."""
    tail = strip_reasoning(response)
    if tail is None:
        return None, "unthinking"
    boxed = last_boxed(tail)
    if boxed is None or not boxed:
        return None, "no_answer"
    return boxed, "ok"


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(latex: str) -> list:
    """math-verify parse of one LaTeX expression; [] when nothing mathematical was found.

    math-verify falls back to returning the raw string; a result holding no sympy object
    means the expression was not understood, so it is dropped here (graded unparseable).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    out = parse(f"${latex}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                parsing_timeout=_timeout())
    return out if any(not isinstance(x, str) for x in out) else []


def parse_gold(answer: str):
    """Parse a gold answer (plain or LaTeX); raises :class:`MathGradeError` if it cannot be."""
    text = str(answer).strip()
    boxed = last_boxed(text)
    gold = _parse(boxed if boxed is not None else text)
    if not gold:
        raise MathGradeError(f"gold answer {answer!r} cannot be parsed by math-verify")
    return gold


def grade_math(response: str, answer: str, gold=None) -> MathVerdict:
    """Grade one response against the gold ``answer`` (``gold``: a pre-parsed answer)."""
    from math_verify import verify

    extracted, reason = extract_answer(response)
    if extracted is None:
        return MathVerdict(False, None, reason)
    gold = parse_gold(answer) if gold is None else gold
    pred = _parse(extracted)
    if not pred:
        return MathVerdict(False, extracted, "unparseable")
    ok = bool(verify(gold, pred, timeout_seconds=_timeout()))
    return MathVerdict(ok, extracted, "correct" if ok else "wrong")

"""Produce tests/fixtures/parity/math_parity.json: the reference verdicts on the math parity cases.

The reference is math-verify's documented use on the whole response, as lighteval and open-r1
call it: ``verify(parse(f"${gold}$"), parse(response))`` (the gold answer in LaTeX
delimiters, as in its README) with math-verify's default extraction (LaTeX
and plain expressions; boxed answers first, else the last answer-like expression anywhere,
reasoning included). Rerun after changing ``tools/parity_math_cases.py`` (see docs/eval.md):

    .venv/bin/python tools/math_parity.py
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from parity_math_cases import CASES  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "parity" / "math_parity.json"


def reference(response: str, gold: str) -> tuple[bool, str]:
    """(correct, what was extracted) by math-verify's documented default call."""
    from math_verify import parse, verify

    pred = parse(response)
    return bool(verify(parse(f"${gold}$"), pred)), str(pred[-1]) if pred else ""


def main() -> None:
    rows = []
    for cid, response, gold, differs in CASES:
        ok, extracted = reference(response, gold)
        rows.append({"id": cid, "response": response, "gold": gold, "reference": ok,
                     "reference_extracted": extracted, "documented_difference": differs})
        print(f"{cid:36s} {'correct' if ok else 'wrong':8s} {extracted[:40]!r}", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": f"math-verify {version('math-verify')}: verify(parse('$gold$'), "
                                            "parse(response))", "cases": rows}, indent=1) + "\n")
    print(f"wrote {len(rows)} cases to {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

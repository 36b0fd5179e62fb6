"""Tiny benchmark fixtures (never real problems): three math problems and two LiveCodeBench-style
code problems in the hub schemas, written as local JSONL files, and a correct answer for each."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path

MATH_ROWS = [
    {"id": "m1", "problem": "What is $3 + 4$?", "answer": "7"},
    {"id": "m2", "problem": "What is half of $1$?", "answer": "\\frac{1}{2}"},
    {"id": "m3", "problem": "What is $2^5$?", "answer": "32"},
]


def lcb_encode(obj) -> str:
    """LiveCodeBench's private-test encoding: base64(zlib(pickle(json string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(obj)))).decode()


CODE_ROWS = [
    {"question_id": "c1", "question_title": "Double", "contest_date": "2024-09-01T00:00:00",
     "question_content": "Read an integer n and print 2n.", "starter_code": "",
     "public_test_cases": json.dumps([{"input": "3\n", "output": "6\n", "testtype": "stdin"}]),
     "private_test_cases": lcb_encode([{"input": "21\n", "output": "42\n", "testtype": "stdin"}]),
     "metadata": "{}"},
    {"question_id": "c2", "question_title": "Add", "contest_date": "2025-03-01T00:00:00",
     "question_content": "Return a + b.", "starter_code": "class Solution:\n    def add(self, a, b):\n        ",
     "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
     "private_test_cases": json.dumps([{"input": "-5\n5", "output": "0", "testtype": "functional"}]),
     "metadata": json.dumps({"func_name": "add"})},
]

CORRECT = {
    "m1": "<think>3+4 is 7</think>The answer is $\\boxed{7}$.",
    "m2": "So it is \\boxed{0.5}.",
    "m3": "\\boxed{32}",
    "c1": "<think>easy</think>```python\nprint(2 * int(input()))\n```",
    "c2": "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_math_fixture(d: Path) -> Path:
    return write_jsonl(d / "tiny_math.jsonl", MATH_ROWS)


def write_code_fixture(d: Path) -> Path:
    return write_jsonl(d / "tiny_code.jsonl", CODE_ROWS)

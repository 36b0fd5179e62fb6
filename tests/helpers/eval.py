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


# --------------------------------------------------------------------------- the hub datasets' row formats
# Field names and types as published (HuggingFaceH4/aime_2024, math-ai/aime25, MathArena/hmmt_feb_2025,
# livecodebench/code_generation_lite); the contents are made up.

AIME24_ROWS = [
    {"id": 60, "problem": "Find $x$ if $x + 1 = 205$.", "solution": "Subtract: $x = \\boxed{204}$.",
     "answer": "204", "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
     "year": "2024"},
    {"id": 61, "problem": "Compute $3 \\cdot 11$.", "solution": "$\\boxed{033}$", "answer": "033",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_2", "year": "2024"},
]
AIME25_ROWS = [
    {"problem": "Find the sum of all integer bases $b>9$ such that ...", "answer": "70", "id": "0"},
    {"problem": "Compute $5 \\cdot 117$.", "answer": "585", "id": "1"},
]
HMMT25_ROWS = [
    {"problem_idx": 1, "problem": "Compute $\\sqrt{23}$ over $23 / 9$.", "answer": "\\frac{9\\sqrt{23}}{23}",
     "problem_type": ["Algebra"]},
    {"problem_idx": 2, "problem": "Compute $2 - 3$.", "answer": "-1", "problem_type": ["Number Theory", "Algebra"]},
]


def lcb_row(qid: str, date: str, tests_public: list[dict], tests_private: list[dict], func_name: str | None,
            starter: str = "", platform: str = "atcoder") -> dict:
    """One row of livecodebench/code_generation_lite: JSON public tests, base64/zlib/pickle private tests,
    metadata as a JSON string."""
    return {"question_title": f"Problem {qid}", "question_content": f"Solve problem {qid}.", "platform": platform,
            "question_id": qid, "contest_id": f"c-{qid}", "contest_date": date, "starter_code": starter,
            "difficulty": "easy", "public_test_cases": json.dumps(tests_public),
            "private_test_cases": lcb_encode(tests_private),
            "metadata": json.dumps({"func_name": func_name} if func_name else {})}


LCB_ROWS = [
    lcb_row("abc370_a", "2024-09-07T00:00:00", [{"input": "3 4\n", "output": "7\n", "testtype": "stdin"}],
            [{"input": "1000000000 7\n", "output": "1000000007\n", "testtype": "stdin"}], None),
    lcb_row("3543", "2024-10-12T07:30:00",
            [{"input": "[1, 2, 3]\n2", "output": "5", "testtype": "functional"}],
            [{"input": "[4]\n1", "output": "4", "testtype": "functional"}], "maxSum",
            "class Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n        ", "leetcode"),
    lcb_row("abc395_b", "2025-03-01T00:00:00", [{"input": "2\n", "output": "4\n", "testtype": "stdin"}],
            [{"input": "10\n", "output": "20\n", "testtype": "stdin"}], None),
    lcb_row("abc330_a", "2023-11-25T00:00:00", [{"input": "1\n", "output": "1\n", "testtype": "stdin"}], [], None),
]
LCB_SOLUTIONS = {
    "abc370_a": "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
    "3543": "```python\nclass Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n"
            "        return sum(sorted(nums)[-k:])\n```",
    "abc395_b": "<think>double it</think>\n```python\nprint(2 * int(input()))\n```",
}


def write_lcb_copy(d: Path) -> Path:
    """A local copy of livecodebench/code_generation_lite (one release file) holding :data:`LCB_ROWS`."""
    root = d / "code_generation_lite"
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "test.jsonl", LCB_ROWS)
    return root


def memorize_answers(model_dir: Path, out_dir: Path, problems: list, answers: dict[str, str],
                     steps: int = 300, lr: float = 1e-2) -> Path:
    """A copy of ``model_dir`` trained (plain AdamW, fp32, in this process) until it answers each
    problem's rendered prompt with ``answers[problem_id]`` plus the end-of-turn token: a tiny
    model whose samples really contain programs, so the eval stage's code path reaches the sandbox.
    Published as the sft stage of run ``coder`` in a file store at ``out_dir``; returns the
    published checkpoint's directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.data.chat import encode_prompt
    from lopd.layout import stage_prefix
    from lopd.manifest import publish
    from lopd.store import open_store

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = []
    for p in problems:
        prompt = encode_prompt(tok, p.messages)
        answer = tok.encode(answers[p.problem_id], add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
        ids = torch.tensor([prompt + answer])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        seqs.append((ids, labels))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        ids, labels = seqs[step % len(seqs)]
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir / "hf")
    tok.save_pretrained(out_dir / "hf")
    prefix = stage_prefix("coder", "sft")
    publish(open_store(str(out_dir)), prefix, out_dir / "hf", stage="sft", run_id="coder")
    return out_dir / prefix

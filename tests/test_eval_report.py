"""``report_from_store`` on both store backends (file and a real SeaweedFS S3): a published eval stage
with two checkpoints becomes summary.json, report.md and a PNG, published with their own manifest."""

from __future__ import annotations

import json

import pyarrow as pa

from lopd.data.schemas import EVAL_RECORD, write_table
from lopd.eval.grading import grading_rules
from lopd.eval.report import report_from_store
from lopd.eval_config import EvalConfig
from lopd.layout import stage_prefix
from lopd.manifest import publish, read_manifest
from lopd.store import open_store


def test_report_from_store(store_uri, tmp_path):
    local = tmp_path / "stage" / "shards" / "0-of-1"
    local.mkdir(parents=True)
    rows = []
    for ck, ok_every in (("sft", 3), ("opd", 2)):
        for b, kind_n in (("mathy", 4), ("cody", 3)):
            for i in range(kind_n):
                for j in range(4):
                    ok = (i * 4 + j) % ok_every == 0
                    rows.append({"benchmark": b, "problem_id": f"{b}{i}", "sample_index": j, "response": "r",
                                 "extracted": "1" if ok else None, "correct": ok, "num_tokens": 5 + j,
                                 "checkpoint": ck, "finish_reason": "length" if j == 3 else "stop",
                                 "verdict": "correct" if ok else "wrong"})
    write_table(pa.Table.from_pylist(rows, schema=EVAL_RECORD), local / "part-00000.parquet", EVAL_RECORD)
    store = open_store(store_uri)
    prefix = stage_prefix("rep", "eval")
    publish(store, prefix, tmp_path / "stage", stage="eval", run_id="rep",
            lineage={"run_id": "rep", "k": 4, "kinds": {"mathy": "math", "cody": "code"},
                     "sampling": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8},
                     "checkpoint_uris": {"sft": "s3://x/sft", "opd": "s3://x/opd"},
                     "grading": grading_rules(EvalConfig(code_timeout_s=4))})
    summary, out = report_from_store(store, prefix, tmp_path / "out")
    assert summary["checkpoints"] == ["sft", "opd"] and summary["benchmarks"] == ["mathy", "cody"]
    assert summary["results"]["opd"]["benchmarks"]["mathy"]["avg"] == 0.5
    assert summary["results"]["sft"]["benchmarks"]["cody"]["truncation_rate"] == 0.25
    m, _ = read_manifest(store, f"{prefix}/report", verify=True)
    assert sorted(f.path for f in m.files) == ["accuracy.png", "report.md", "summary.json"]
    assert m.stage == "eval-report" and "opd/math_avg" in m.metrics
    assert json.loads(store.read_bytes(f"{prefix}/report/summary.json"))["k"] == 4
    assert store.read_bytes(f"{prefix}/report/accuracy.png")[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| benchmark | sft | opd |" in md and "`s3://x/opd`" in md
    assert summary["grading"]["code"]["timeout_per_test_s"] == 4
    assert "## Grading rules" in md and "**code.timeout_per_test_s**: 4" in md and "LiveCodeBench" in md
    assert "**math.extraction**: last \\boxed{}" in md

"""lopd repro's cost columns (:mod:`lopd.repro_cost`): tokens sampled, scored and trained and
seconds by phase per row, from fabricated manifests, metrics and runner timings in a file store."""

from __future__ import annotations

import json
from pathlib import Path

from lopd.repro_results import SFT_ROW, write_results
from tests.helpers.repro import study


def _publish(store, tmp_path, run_id: str, stage: str, files: dict[str, str] | None = None, **metrics) -> None:
    from lopd.layout import stage_prefix
    from lopd.manifest import publish

    local = tmp_path / "local" / run_id / stage  # a real manifest, with metrics and listed files
    local.mkdir(parents=True)
    for name, text in (files or {"data.txt": "x"}).items():
        (local / name).write_text(text)
    publish(store, stage_prefix(run_id, stage), local, stage=stage, run_id=run_id, metrics=metrics)


def _steps(*steps: dict) -> dict[str, str]:
    return {"metrics.jsonl": "".join(json.dumps({"step": i + 1, **x}) + "\n" for i, x in enumerate(steps))}


def _timings(root: Path, run_id: str, *lines: tuple[str, float]) -> None:
    """``logs/timings.jsonl`` lines as the local runner writes them (``bootstrap``: the teacher's sft)."""
    (root / "runs" / run_id / "logs").mkdir(parents=True, exist_ok=True)
    with open(root / "runs" / run_id / "logs" / "timings.jsonl", "a") as f:
        for st, secs in lines:
            rec = {"stage": st, "label": f"{run_id} {st}", "seconds": secs, "returncode": 0}
            f.write(json.dumps(rec if st != "bootstrap" else {**rec, "stage": "sft", "label": "bootstrap: sft"}) + "\n")


def test_cost_of_rounds_topk_shared_online_and_control_rows(tmp_path):
    from lopd.repro_cost import row_cost
    from lopd.repro_run import collect

    root = tmp_path / "store"
    s = study(root, "repro.rows={sft-continued,seqkd,lightning,online,inconsistent,rounds2}", "repro.seeds={0,1}")
    store = s.store
    _publish(store, tmp_path, "tiny", "precompute", response_tokens=1000, scored_tokens=1000, sample_s=10.0, score_s=5)
    _publish(store, tmp_path, "tiny-p-words", "precompute", response_tokens=900, scored_tokens=900)  # no timings
    _publish(store, tmp_path, "tiny-kd", "sft-data", response_tokens=700, sample_s=6.0)  # the teacher samples
    _timings(root, "tiny-kd", ("sft-data", 8.0))
    _timings(root, "tiny", ("bootstrap", 99.0), ("sft", 50.0), ("precompute", 20.0), ("precompute", 4.0))
    for seed in (0, 1):
        rid = lambda n, seed=seed: s.run_id(n, seed)  # noqa: E731
        _publish(store, tmp_path, rid("lightning"), "opd",
                 _steps({"response_tokens": 100, "step_time_s": 1.0}, {"response_tokens": 120, "step_time_s": 2.0}))
        _timings(root, rid("lightning"), ("opd", 7.0 + seed))
        _publish(store, tmp_path, rid("online"), "opd", _steps(
            {"response_tokens": 50, "step_time_s": 1.0, "sync_s": 0.5, "sample_s": 2.0, "score_s": 1.5}))
        _publish(store, tmp_path, rid("inconsistent"), "opd", _steps({"response_tokens": 10, "step_time_s": 1.0}))
        _timings(root, rid("inconsistent"), ("opd", 3.0))
        _publish(store, tmp_path, rid("sft-continued"), "sft", _steps({"target_tokens": 300, "step_time_s": 0.5}))
        _timings(root, rid("sft-continued"), ("sft", 4.0))
        _publish(store, tmp_path, rid("seqkd"), "sft", _steps({"target_tokens": 280, "step_time_s": 0.5}))
        _timings(root, rid("seqkd"), ("sft", 4.5))
        for stage, n, sample_s, score_s in (("precompute", 500, 4.0, 2.0), ("precompute-r2", 400, 6.0, 3.0)):
            _publish(store, tmp_path, rid("rounds2"), stage, response_tokens=n, scored_tokens=n, sample_s=sample_s,
                     score_s=score_s)
        _publish(store, tmp_path, rid("rounds2"), "opd-r2",  # the last round's history holds every step
                 _steps({"response_tokens": 100, "step_time_s": 1.0}, {"response_tokens": 100, "step_time_s": 3.0}))
        _timings(root, rid("rounds2"), ("precompute", 8.0), ("opd", 5.0), ("opd", 2.0), ("precompute-r2", 9.0),
                 ("opd-r2", 6.0))
        summary = {"benchmarks": ["arith"], "results": {
            n: {"benchmarks": {"arith": {"avg": 0.5 + 0.01 * seed}}} for n in [SFT_ROW, *s.variants]}}
        _publish(store, tmp_path, s.eval_run_id(seed), "eval/report", {"summary.json": json.dumps(summary)})

    # sampled, scored, trained tokens; sampling, scoring, training, total seconds (QUANTITIES)
    assert list(row_cost(s, "lightning", 1).values()) == [1000, 1000, 220, 10, 5, 3, 32]  # the shared precompute
    assert list(row_cost(s, "rounds2", 0).values()) == [900, 900, 200, 10, 5, 4, 30]  # both rounds, every process
    assert list(row_cost(s, "online", 0).values()) == [50, 50, 50, 2.5, 1.5, 1, None]  # no timings recorded
    assert list(row_cost(s, "inconsistent", 0).values()) == [900, 900, 10, None, None, 1, None]  # -p-words: no *_s
    assert list(row_cost(s, "seqkd", 1).values()) == [700, 0, 280, 6, 0, 0.5, 12.5]  # the teacher's answers
    assert list(row_cost(s, "sft-continued", 0).values()) == [0, 0, 300, 0, 0, 0.5, 4]

    res = collect(s)
    assert list(res["rows"]) == [SFT_ROW, "sft-continued", "seqkd", "lightning", "online", "inconsistent", "rounds2"]
    assert res["rows"]["seqkd"]["sft_data"] == "opd" and res["rows"]["inconsistent"]["teacher"] == "words"
    assert res["rows"][SFT_ROW]["cost"] is None and res["rows"]["rounds2"]["stage"] == "opd-r2"
    assert res["rows"]["lightning"]["cost"]["total_s"] == {"seeds": {"0": 31.0, "1": 32.0}, "mean": 31.5}
    assert res["rows"]["online"]["cost"]["total_s"]["mean"] is None
    assert res["rows"]["rounds2"]["train_seconds"]["mean"] == 4.0  # every round's steps
    write_results(s.dir, res)
    md = (s.dir / "results.md").read_text()
    header = ("| method | accuracy (%) | Δ vs SFT, paired (points) | sampled tokens | scored tokens | trained tokens | "
              "sampling s | scoring s | training s | total s | × lightning |")
    assert header in md and "as if they ran alone" in md
    assert "| lightning | 50.5 ± 6.4 | +0.0 ± 0.0 | 1.00k | 1.00k | 220 | 10.0 | 5.0 | 3.0 | 31.5 | 1.00× |" in md
    assert "| rounds2 | 50.5 ± 6.4 | +0.0 ± 0.0 | 900 | 900 | 200 | 10.0 | 5.0 | 4.0 | 30.0 | 0.95× |" in md
    assert "| online | 50.5 ± 6.4 | +0.0 ± 0.0 | 50 | 50 | 50 | 2.5 | 1.5 | 1.0 | – | – |" in md
    assert "| inconsistent | 50.5 ± 6.4 | +0.0 ± 0.0 | 900 | 900 | 10 | – | – | 1.0 | – | – |" in md
    assert f"| {SFT_ROW} | 50.5 ± 6.4 |  |" in md



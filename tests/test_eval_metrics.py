"""avg@k, its intervals and pass@k against direct computations; the report files."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

from lopd.eval.metrics import avg_at_k, benchmark_metrics, group_average, pass_at_k, pass_ks
from lopd.eval.report import render_markdown, summarize, write_report


def synthetic(n_problems: int, k: int, seed: int = 0, p=None) -> list[list[bool]]:
    rng = random.Random(seed)
    ps = p or [rng.random() for _ in range(n_problems)]
    return [[rng.random() < ps[i] for _ in range(k)] for i in range(n_problems)]


def test_avg_at_k_matches_direct_computation():
    res = synthetic(17, 8, seed=1)
    m = avg_at_k(res)
    direct = sum(sum(r) / len(r) for r in res) / len(res)
    assert m["avg"] == pytest.approx(direct)
    # SE: sqrt(sum_i s_i^2 / k) / n with s_i^2 the unbiased per-problem sample variance
    var = sum(np.var(np.array(r, dtype=float), ddof=1) / len(r) for r in res)
    assert m["stderr"] == pytest.approx(math.sqrt(var) / len(res))
    assert m["stderr_problems"] == pytest.approx(np.std([sum(r) / len(r) for r in res], ddof=1) / math.sqrt(17))
    lo, hi = m["ci95"]
    assert lo == pytest.approx(max(0, direct - 1.959963984540054 * m["stderr"]))
    assert hi == pytest.approx(min(1, direct + 1.959963984540054 * m["stderr"]))
    assert (m["problems"], m["samples"], m["k_min"], m["k_max"]) == (17, 136, 8, 8)


def test_pass_at_k_matches_enumeration():
    """Unbiased pass@k = probability that a random k-subset of the n samples has a correct one."""
    for n, c in [(5, 0), (5, 1), (5, 3), (6, 6), (8, 2), (10, 7)]:
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            direct = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(direct), (n, c, k)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    assert pass_ks(16) == [1, 2, 4, 8, 16] and pass_ks(6) == [1, 2, 4, 6]


def test_intervals_shrink_as_k_grows():
    ps = [0.1, 0.3, 0.5, 0.7, 0.9, 0.4, 0.6, 0.2]
    widths = []
    for k in (4, 16, 64, 256):
        # median over repetitions so the check is about the estimator, not one draw
        w = np.median([np.diff(avg_at_k(synthetic(len(ps), k, seed=s, p=ps))["ci95"])[0] for s in range(20)])
        widths.append(w)
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False)), widths
    assert widths[0] / widths[-1] == pytest.approx(8, rel=0.25)  # 1/sqrt(k): sqrt(256/4) = 8


def test_k_equal_one_uses_problem_spread():
    m = avg_at_k([[True], [False], [True], [False]])
    assert m["avg"] == 0.5 and m["stderr"] == pytest.approx(m["stderr_problems"]) and m["stderr"] > 0


def _rows(ckpt: str, bench: str, res: list[list[bool]], tokens: int = 10, truncate_every: int = 0) -> list[dict]:
    out = []
    for i, r in enumerate(res):
        for j, ok in enumerate(r):
            trunc = truncate_every and (i * len(r) + j) % truncate_every == 0
            out.append({"checkpoint": ckpt, "benchmark": bench, "problem_id": f"p{i}", "sample_index": j,
                        "correct": ok, "num_tokens": tokens + j, "finish_reason": "length" if trunc else "stop",
                        "verdict": "correct" if ok else "wrong"})
    return out


def test_benchmark_metrics_lengths_and_truncation():
    rows = _rows("a", "b", [[True, False], [False, False]], tokens=100, truncate_every=2)
    m = benchmark_metrics(rows)
    assert m["avg"] == 0.25 and m["truncation_rate"] == 0.5
    assert m["mean_tokens"] == 100.5 and m["max_tokens"] == 101
    assert m["pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert m["verdicts"] == {"correct": 1, "wrong": 3}


def test_group_average():
    per = {"x": {"avg": 0.2, "stderr": 0.03}, "y": {"avg": 0.4, "stderr": 0.04}}
    g = group_average(per, ["x", "y", "absent"])
    assert g["avg"] == pytest.approx(0.3) and g["stderr"] == pytest.approx(0.025)
    assert group_average(per, ["absent"]) is None


def test_report_side_by_side(tmp_path):
    rows = []
    for ck, p in (("sft", 0.3), ("opd", 0.5), ("lightning-opd", 0.55)):
        rows += _rows(ck, "m1", synthetic(10, 4, seed=1, p=[p] * 10))
        rows += _rows(ck, "c1", synthetic(6, 4, seed=2, p=[p / 2] * 6))
    summary = summarize(rows, {"m1": "math", "c1": "code"}, {"run_id": "r", "k": 4})
    md = render_markdown(summary)
    assert "| benchmark | sft | opd | lightning-opd |" in md
    assert "**Math avg**" in md and "**Code avg**" in md
    files = write_report(summary, tmp_path)
    assert [f.name for f in files] == ["summary.json", "report.md", "accuracy.png"]
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoints"] == ["sft", "opd", "lightning-opd"]
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "accuracy.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 10  # bars, text: not a blank canvas


def _lcb_pass_at_k(per_problem: dict[str, list[list]], ks: list[int]) -> dict[str, float]:
    """LiveCodeBench's computation (evaluation/pass_k_utils.py): a generation is correct when every test
    result is > 0; per problem ``1 - C(n - c, k) / C(n, k)`` (1 when ``n - c < k``), averaged over
    problems, for the k that every problem has samples for. Written here with exact binomials."""
    totals, corrects = [], []
    for gens in per_problem.values():
        totals.append(len(gens))
        corrects.append(sum(all(r is True or (not isinstance(r, bool) and r > 0) for r in g) for g in gens))
    out = {}
    for k in ks:
        if all(n >= k for n in totals):
            vals = [1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
                    for n, c in zip(totals, corrects, strict=True)]
            out[str(k)] = sum(vals) / len(vals)
    return out


def test_pass_at_k_and_avg_at_k_match_livecodebench():
    """lopd's pass@k / avg@k on EVAL rows equal LiveCodeBench's unbiased estimator on the same graded lists
    (its per-test result codes: True passed, -2 wrong answer, -3 timeout, -4 runtime error)."""
    rng = random.Random(7)
    codes = [True, True, True, -2, -3, -4, False]
    per_problem = {f"p{i}": [[rng.choice(codes) for _ in range(rng.randint(1, 4))] for _ in range(16)]
                   for i in range(12)}
    rows = [{"problem_id": p, "correct": all(r is True for r in g), "num_tokens": 1, "finish_reason": "stop"}
            for p, gens in per_problem.items() for g in gens]
    m = benchmark_metrics(rows)
    ref = _lcb_pass_at_k(per_problem, [1, 2, 4, 8, 16, 32])
    assert set(m["pass_at_k"]) == set(ref) == {"1", "2", "4", "8", "16"}
    for k, v in ref.items():
        assert m["pass_at_k"][k] == pytest.approx(v, abs=1e-12), k
    assert m["avg"] == pytest.approx(ref["1"], abs=1e-12)
    assert 0 < ref["1"] < ref["16"] <= 1

"""Evaluation metrics: avg@k with its uncertainty, unbiased pass@k, lengths, truncation.

Notation: a benchmark has ``n`` problems; problem ``i`` got ``k_i`` samples of which ``c_i``
are correct, ``p̂_i = c_i / k_i``.

- **avg@k** (the paper's metric) ``= (1/n) Σ_i p̂_i`` — the mean accuracy over all samples,
  each problem weighted equally.
- **Standard error** of avg@k as an estimate of the model's expected accuracy *on this
  fixed set of problems* (the quantity two checkpoints are compared on): the samples of a
  problem are Bernoulli(p_i), so ``Var(avg@k) = (1/n²) Σ_i p_i (1 − p_i) / k_i``, estimated
  without bias by ``s_i² / k_i`` with ``s_i² = p̂_i (1 − p̂_i) · k_i / (k_i − 1)``. It
  shrinks like ``1/√k``. With ``k = 1`` it cannot be estimated from within-problem spread,
  and the across-problem standard error is used instead.
- **Across-problem standard error** ``std_i(p̂_i) / √n`` (``stderr_problems``): the
  uncertainty when the problems themselves are seen as a sample from a larger population
  (it does not shrink with k). Reported alongside, not used for the interval.
- **95% interval**: ``avg@k ± 1.96 · SE``, clipped to [0, 1].
- **pass@k** (Chen et al. 2021, unbiased): ``1 − C(k_i − c_i, k) / C(k_i, k)`` per problem,
  averaged; computed as a running product to avoid huge binomials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` correct: ``1 − C(n−c, k)/C(n, k)``.

    Stable form: ``1 − Π_{j=n−c+1}^{n} (1 − k/j)``. Requires ``1 ≤ k ≤ n``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_ks(k_max: int) -> list[int]:
    """The pass@k values reported for ``k_max`` samples: 1, 2, 4, … up to ``k_max`` (and ``k_max``)."""
    ks = [1]
    while ks[-1] * 2 <= k_max:
        ks.append(ks[-1] * 2)
    if ks[-1] != k_max:
        ks.append(k_max)
    return ks


def avg_at_k(correct: Sequence[Sequence[bool]]) -> dict:
    """avg@k, its standard errors and 95% interval from per-problem sample outcomes.

    ``correct[i]`` is the list of outcomes of problem i (k_i ≥ 1 samples). Returns
    ``{"avg", "stderr", "stderr_problems", "ci95": [lo, hi], "problems", "samples", "k_min", "k_max"}``.
    """
    ks = np.array([len(c) for c in correct], dtype=float)
    if len(ks) == 0:
        return {"avg": float("nan"), "stderr": float("nan"), "stderr_problems": float("nan"),
                "ci95": [float("nan"), float("nan")], "problems": 0, "samples": 0, "k_min": 0, "k_max": 0}
    if (ks < 1).any():
        raise ValueError("every problem needs at least one sample")
    p = np.array([sum(bool(x) for x in c) for c in correct], dtype=float) / ks
    n = len(p)
    avg = float(p.mean())
    se_problems = float(p.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if (ks >= 2).all():
        s2 = p * (1 - p) * ks / (ks - 1)
        se = float(math.sqrt((s2 / ks).sum()) / n)
    else:
        se = se_problems
    half = Z95 * se if not math.isnan(se) else float("nan")
    return {"avg": avg, "stderr": se, "stderr_problems": se_problems,
            "ci95": [max(0.0, avg - half), min(1.0, avg + half)] if not math.isnan(half) else [avg, avg],
            "problems": n, "samples": int(ks.sum()), "k_min": int(ks.min()), "k_max": int(ks.max())}


def length_stats(num_tokens: Sequence[int], truncated: Sequence[bool]) -> dict:
    """Response length mean / median / p90 / max (tokens) and the truncation rate."""
    x = np.asarray(num_tokens, dtype=float)
    if x.size == 0:
        return {"mean_tokens": float("nan"), "median_tokens": float("nan"), "p90_tokens": float("nan"),
                "max_tokens": 0, "truncation_rate": float("nan")}
    return {"mean_tokens": float(x.mean()), "median_tokens": float(np.median(x)),
            "p90_tokens": float(np.percentile(x, 90)), "max_tokens": int(x.max()),
            "truncation_rate": float(np.mean(np.asarray(truncated, dtype=bool)))}


def benchmark_metrics(rows: list[dict]) -> dict:
    """All metrics of one (checkpoint, benchmark) from its EVAL rows.

    Rows carry ``problem_id``, ``correct``, ``num_tokens``, ``finish_reason`` (and ``verdict``).
    """
    by_problem: dict[str, list[bool]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    problems = sorted(by_problem)
    outcomes = [by_problem[p] for p in problems]
    out = avg_at_k(outcomes)
    k_min = out["k_min"]
    out["pass_at_k"] = {str(k): float(np.mean([pass_at_k(len(c), sum(c), k) for c in outcomes]))
                        for k in (pass_ks(k_min) if k_min else [])}
    out.update(length_stats([r["num_tokens"] for r in rows], [r.get("finish_reason") == "length" for r in rows]))
    verdicts: dict[str, int] = {}
    for r in rows:
        v = r.get("verdict") or ("correct" if r["correct"] else "wrong")
        verdicts[v] = verdicts.get(v, 0) + 1
    out["verdicts"] = dict(sorted(verdicts.items()))
    return out


def group_average(per_benchmark: dict[str, dict], names: Sequence[str]) -> dict | None:
    """Unweighted mean of the benchmarks' avg@k (as in the paper's "Math avg" / "Code avg"),
    with SE ``sqrt(Σ SE_b²) / B`` (benchmarks are independent) and its 95% interval."""
    present = [per_benchmark[n] for n in names if n in per_benchmark and not math.isnan(per_benchmark[n]["avg"])]
    if not present:
        return None
    avg = float(np.mean([m["avg"] for m in present]))
    ses = [m["stderr"] for m in present]
    se = float(math.sqrt(sum(s * s for s in ses)) / len(present)) if not any(math.isnan(s) for s in ses) \
        else float("nan")
    half = Z95 * se if not math.isnan(se) else 0.0
    return {"avg": avg, "stderr": se, "ci95": [max(0.0, avg - half), min(1.0, avg + half)],
            "benchmarks": [n for n in names if n in per_benchmark]}

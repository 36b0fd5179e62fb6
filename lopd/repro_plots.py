"""The study's training diagnostics per row (``diagnostics.png`` beside ``results.md``).

For every OPD row, the seed mean of two per-step series its training run logged
(``metrics.jsonl``):

- ``kl_to_sft``: the k3 estimate of KL(sampler ‖ current policy) on the step's tokens, where the
  sampler is the policy that sampled them: the SFT student for one-round Lightning rows (how far
  the student has moved from it), each round's starting student with Lightning rounds (so it
  restarts at 0 each round), the current student for online OPD (always 0);
- ``reverse_kl_est``: −mean advantage, the sampled-token estimate of the reverse KL(student ‖
  teacher) on the step's rollouts (offline: on the stored rollouts, so it also falls when the
  student only learns those; online: on fresh ones).

Rows whose runs did not log them (the SFT row, the SFT control) have none. Also
``grad-cosine.png``, the offline-vs-online gradient cosine (:mod:`lopd.repro_cosine`). Pure
functions of the per-step records; nothing here reads a store.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

DIAGNOSTICS = (("kl_to_sft", "KL to the rollouts' sampler (k3, nats/token)"),
               ("reverse_kl_est", "reverse KL to the teacher, estimate (nats/token)"))
"""The plotted per-step series and their axis labels."""
COSINE_KEYS = ("grad_cosine", "grad_norm_ratio")
"""The offline-vs-online gradient diagnostic's per-step metrics (:mod:`lopd.repro_cosine`)."""


def mean_series(runs: list[list[dict[str, Any]]]) -> dict[str, list[float]] | None:
    """Per step, the mean over ``runs`` (one list of per-step records per seed) of each
    :data:`DIAGNOSTICS` series, over the steps every run logged; None when no run logged them."""
    keys = [k for k, _ in DIAGNOSTICS]
    by_step = [{r["step"]: r for r in run if all(k in r for k in keys)} for run in runs]
    steps = sorted(set.intersection(*(set(b) for b in by_step))) if by_step else []
    if not steps:
        return None
    out: dict[str, list[float]] = {"step": [float(s) for s in steps]}
    for k in keys:
        out[k] = [statistics.fmean(float(b[s][k]) for b in by_step) for s in steps]
    return out


def write_diagnostics(out: Path, results: dict[str, Any]) -> Path | None:
    """``<out>/diagnostics.png``: one panel per series, one line per row that has it; None when
    no row does."""
    rows = {n: r["diagnostics"] for n, r in results["rows"].items() if r.get("diagnostics")}
    if not rows:
        return None
    fig, axes = _pyplot().subplots(1, len(DIAGNOSTICS), figsize=(6 * len(DIAGNOSTICS), 4))
    for ax, (key, label) in zip(axes, DIAGNOSTICS, strict=True):
        for name, d in rows.items():
            ax.plot(d["step"], d[key], label=name, lw=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[-1].legend(fontsize=7, ncol=2)
    n = len(results["seeds"])
    title = f"lopd repro {results['run_id']}: training diagnostics, mean of {n} seed{'s' if n > 1 else ''}"
    return _save(fig, out / "diagnostics.png", title)


def write_grad_cosine(out: Path, results: dict[str, Any]) -> Path | None:
    """``grad-cosine.png``: cosine and norm ratio per measured step, one line per row."""
    data = results.get("grad_cosine")
    if not data:
        return None
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    for name, d in data.items():
        for ax, key in zip(axes, COSINE_KEYS, strict=True):
            ax.plot(d["step"], d[key], marker="o", label=name)
    axes[0].set_ylabel("cosine(offline, online gradient)")
    axes[1].set_ylabel("|offline| / |online| gradient norm")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = f"lopd repro {results['run_id']}: offline vs online OPD gradient, seed {results['seeds'][0]}"
    return _save(fig, out / "grad-cosine.png", title)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


__all__ = ["COSINE_KEYS", "DIAGNOSTICS", "mean_series", "write_diagnostics", "write_grad_cosine"]

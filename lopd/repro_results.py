"""The results of a ``lopd repro`` study (:mod:`lopd.repro`): means with 95% intervals, the
markdown table and PNG, and ``lopd repro check`` against an expected-results file. Pure
functions of ``results.json``; nothing here trains or evaluates."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lopd import LopdError

SFT_ROW = "sft"
# two-sided 95% Student-t quantiles by degrees of freedom (normal beyond the table)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class ReproError(LopdError):
    pass


def mean_ci(xs: list[float]) -> dict[str, float]:
    """Mean and 95% interval half-width over seeds (Student t; 0 for one seed)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "ci95": 0.0}
    t = T95.get(len(xs) - 1, 1.96)
    return {"mean": m, "ci95": t * statistics.stdev(xs) / math.sqrt(len(xs))}



def table(results: dict) -> str:
    n = len(results["seeds"])
    lines = [f"Held-out `{results['benchmark']}` accuracy (avg@{results['eval_k']}), mean ± 95% interval over "
             f"{n} seed{'s' if n > 1 else ''}; every row below SFT: {results['opd_steps']} updates of "
             f"{results['global_batch']} sequences from the same SFT checkpoint.", "",
             "| method | accuracy (%) | Δ vs SFT (points) | training time (s) |", "|---|---|---|---|"]
    sft = results["rows"][SFT_ROW]["accuracy"]["mean"]
    for name, r in results["rows"].items():
        a = r["accuracy"]
        t = r["train_seconds"]
        delta = "" if name == SFT_ROW else f"{100 * (a['mean'] - sft):+.1f}"
        secs = "" if t is None else f"{t['mean']:.1f} ± {t['ci95']:.1f}"
        lines.append(f"| {name} | {100 * a['mean']:.1f} ± {100 * a['ci95']:.1f} | {delta} | {secs} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # rows keep the table order
    (out / "results.md").write_text(table(results))
    names = list(results["rows"])
    means = [100 * results["rows"][n]["accuracy"]["mean"] for n in names]
    errs = [100 * results["rows"][n]["accuracy"]["ci95"] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.6))
    ax.bar(names, means, yerr=errs, capsize=4, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for i, n in enumerate(names):
        for acc in results["rows"][n]["acc"].values():
            ax.plot(i, 100 * acc, "k.", ms=4)
    ax.set_ylabel(f"{results['benchmark']} accuracy (%)")
    ax.set_title(f"lopd repro {results['run_id']}: {len(results['seeds'])} seeds, 95% intervals")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- check


def check(results_file: Path, expected_file: Path) -> list[str]:
    """Rows whose mean accuracy left the expected tolerance, as one line each (empty: pass).

    The expected file: ``{"rows": {name: {"accuracy": mean, "tolerance": points/100}}, "claims":
    [[better, worse, margin], ...]}``; a claim holds when mean(better) - mean(worse) > margin.
    """
    for f in (results_file, expected_file):
        if not f.is_file():
            raise ReproError(f"repro check: file not found: {f}")
    try:
        res, exp = json.loads(results_file.read_text()), json.loads(expected_file.read_text())
        rows = exp["rows"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ReproError(f"repro check: {expected_file}: not an expected-results file ({e})") from None
    failures = []
    got = {n: r["accuracy"]["mean"] for n, r in res["rows"].items()}
    for name, e in rows.items():
        if name not in got:
            failures.append(f"{name}: missing from {results_file}")
        elif abs(got[name] - e["accuracy"]) > e["tolerance"]:
            failures.append(f"{name}: accuracy {got[name]:.3f} is outside {e['accuracy']:.3f} ± {e['tolerance']:.3f}")
    for better, worse, margin in exp.get("claims", []):
        if better in got and worse in got and not got[better] - got[worse] > margin:
            failures.append(f"claim {better} > {worse} + {margin}: {got[better]:.3f} vs {got[worse]:.3f}")
    return failures

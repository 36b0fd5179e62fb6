"""The results of a ``lopd repro`` study (:mod:`lopd.repro`): means with 95% intervals, the
markdown table and PNG, and ``lopd repro check`` against an expected-results file. Pure
functions of ``results.json``; nothing here trains or evaluates."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lopd import LopdError
from lopd.repro_plots import write_diagnostics, write_grad_cosine

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


PAIRED_TEST = "paired t-test over seeds, two-sided, 5%"


def paired(acc: dict[str, float], base: dict[str, float]) -> dict[str, float | int | bool | str]:
    """A row's accuracy minus ``base``'s, seed by seed (each seed's row against the same seed's
    evaluation of the base): the mean difference, its 95% Student-t interval over seeds and whether
    the interval excludes 0 (the paired t-test at 5%; never with one seed)."""
    seeds = [s for s in acc if s in base]
    d = mean_ci([acc[s] - base[s] for s in seeds])
    return {**d, "seeds": len(seeds), "significant": len(seeds) > 1 and abs(d["mean"]) > d["ci95"],
            "test": PAIRED_TEST}


COST_COLUMNS = (("sampled_tokens", "sampled tokens"), ("scored_tokens", "scored tokens"),
                ("trained_tokens", "trained tokens"), ("sample_s", "sampling s"), ("score_s", "scoring s"),
                ("train_s", "training s"), ("total_s", "total s"))
"""Cost quantities of a row (:mod:`lopd.repro_cost`) and their column headers, in the table's order."""
BASELINE = "lightning"
"""The row the ``× lightning`` column divides every row's total seconds by (when the table has it)."""


def _tokens(x: float | None) -> str:
    """A token count for the table: ``393k``, ``1.23M``, ``512``; ``–`` when unknown."""
    if x is None:
        return "–"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            v = x / scale
            return f"{v:.{2 if v < 10 else 1 if v < 100 else 0}f}{unit}"
    return f"{x:.0f}"


def _seconds(x: float | None) -> str:
    """Seconds for the table: one decimal below 100, whole seconds above; ``–`` when unknown."""
    return "–" if x is None else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _cost(r: dict, q: str) -> float | None:
    cost = r.get("cost")
    return None if not cost or q not in cost else cost[q]["mean"]


def _delta(d: dict) -> str:
    """``+2.7 ± 1.9*`` (points; * = significant), or ``+2.7`` with one seed."""
    if d["seeds"] < 2:
        return f"{100 * d['mean']:+.1f}"
    return f"{100 * d['mean']:+.1f} ± {100 * d['ci95']:.1f}" + ("*" if d["significant"] else "")


def table(results: dict) -> str:
    """``results.md``: accuracy with 95% intervals and Δ vs SFT per row, then each row's cost
    (means over seeds) and its total relative to the ``lightning`` row."""
    n = len(results["seeds"])
    rows = results["rows"]
    base = _cost(rows[BASELINE], "total_s") if BASELINE in rows else None
    heads = ["method", "accuracy (%)", "Δ vs SFT, paired (points)"] + [h for _, h in COST_COLUMNS]
    heads += [f"× {BASELINE}"] if BASELINE in rows else []
    other = ", ".join(f"{k}: {r['updates']}" for k, r in rows.items()
                      if r.get("updates") not in (None, results["opd_steps"]))
    lines = [f"Held-out `{results['benchmark']}` accuracy (avg@{results['eval_k']}), mean ± 95% interval over "
             f"{n} seed{'s' if n > 1 else ''}; every row below SFT: {results['opd_steps']} updates of "
             f"{results['global_batch']} sequences from its seed's SFT checkpoint"
             + (f" (other numbers of updates: {other})" if other else "") + ". Δ vs SFT: the mean of the "
             "per-seed differences from the same seed's SFT evaluation with its 95% interval (Student t over "
             "seeds); * where the interval excludes 0 (a paired t-test, two-sided, at 5%).", "",
             "Cost, mean over seeds, of each row's own runs: tokens the student sampled, the teacher scored and "
             "training used (sequence-level distillation: the teacher sampled); seconds sampling (online: with "
             "the weight push), scoring, in training steps, and in "
             "all the row's stage processes with their start-ups (total; – when not recorded). Offline rows on "
             "shared rollouts are charged the whole shared precompute, as if they ran alone; rows with Lightning "
             "rounds every round.", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, r in rows.items():
        a = r["accuracy"]
        cells = [name, f"{100 * a['mean']:.1f} ± {100 * a['ci95']:.1f}",
                 "" if name == SFT_ROW else _delta(r.get("vs_sft") or paired(r["acc"], rows[SFT_ROW]["acc"]))]
        if r.get("cost") is None:
            cells += [""] * (len(heads) - len(cells))
        else:
            cells += [(_tokens if q.endswith("_tokens") else _seconds)(_cost(r, q)) for q, _ in COST_COLUMNS]
            if BASELINE in rows:
                total = _cost(r, "total_s")
                cells.append("–" if total is None or not base else f"{total / base:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + selection_table(results)


def _setting(key: str, value) -> str:
    return {"optim.lr": f"lr {value:g}", "train.steps": f"{value} updates"}.get(key, f"{key} {value}")


def selection_table(results: dict) -> str:
    """The settings each row took on the validation split, and the spread over its candidates
    (empty without a selection)."""
    sel = results.get("selection")
    if not sel:
        return ""
    lines = ["", f"Settings chosen on the validation split (`{sel['validation']}`, seed {sel['seed']}; rule: "
             f"{sel['rule']}), the same grid for every row:", "",
             "| method | chosen | validation (%) | candidates | their validation (%), lowest–highest |",
             "|---|---|---|---|---|"]
    for name, row in sel["rows"].items():
        accs = [100 * c["validation"] for c in row["candidates"]]
        best = max(accs)
        chosen = ", ".join(_setting(k, v) for k, v in row["chosen"].items()) or "the recipe's"
        lines.append(f"| {name} | {chosen} | {best:.1f} | {len(accs)} | {min(accs):.1f}–{best:.1f} |")
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
    write_diagnostics(out, results)
    write_grad_cosine(out, results)


# ---------------------------------------------------------------------- check


def expected(results: dict, minimum: float = 0.01) -> dict:
    """The expected-results file a study's results imply: each row's mean with a tolerance of its
    95% interval over seeds (at least ``minimum``), and a claim ``[better, worse, margin]`` for each
    row whose paired difference from SFT excludes 0, the margin at the interval's end nearest 0."""
    rows, claims = {}, []
    for name, r in results["rows"].items():
        a = r["accuracy"]
        rows[name] = {"accuracy": round(a["mean"], 4), "tolerance": round(max(a["ci95"], minimum), 4)}
        d = r.get("vs_sft")
        if d and d["significant"]:
            margin = math.floor(1000 * (abs(d["mean"]) - d["ci95"])) / 1000
            claims.append([name, SFT_ROW, margin] if d["mean"] > 0 else [SFT_ROW, name, margin])
    n = len(results["seeds"])
    return {"about": f"lopd repro {results['run_id']}, {n} seeds: each row's mean with its 95% interval over seeds "
                     "as the tolerance; a claim per row whose paired difference from SFT excludes 0 (margin: the "
                     "interval's end nearest 0). Written by lopd repro expect.",
            "rows": rows, "claims": claims}


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

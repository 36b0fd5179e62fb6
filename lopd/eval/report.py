"""Evaluation report: ``summary.json``, ``report.md`` (checkpoints side by side) and a PNG chart.

:func:`summarize` turns per-sample EVAL rows into metrics per (checkpoint, benchmark) plus the
paper's "Math avg" and "Code avg"; :func:`write_report` renders the three files;
:func:`report_from_store` does both for a published eval stage (``lopd report``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.eval.metrics import benchmark_metrics, group_average
from lopd.layout import report_prefix

SUMMARY, REPORT_MD, CHART = "summary.json", "report.md", "accuracy.png"


class ReportError(LopdError):
    """No evaluation results to report (names the place looked at)."""


def summarize(rows: Iterable[dict], kinds: dict[str, str], meta: dict[str, Any] | None = None) -> dict:
    """Metrics of every (checkpoint, benchmark) from EVAL rows (with ``checkpoint``).

    ``kinds`` maps benchmark -> math|code (decides the group averages). The checkpoint and
    benchmark orders are those of first appearance.
    """
    groups: dict[str, dict[str, list[dict]]] = {}
    bench_order: list[str] = []
    for r in rows:
        groups.setdefault(r["checkpoint"], {}).setdefault(r["benchmark"], []).append(r)
        if r["benchmark"] not in bench_order:
            bench_order.append(r["benchmark"])
    if not groups:
        raise ReportError("no evaluation rows to summarise")
    results: dict[str, Any] = {}
    for ckpt, by_bench in groups.items():
        per = {b: benchmark_metrics(by_bench[b]) for b in bench_order if b in by_bench}
        math_names = [b for b in bench_order if kinds.get(b) == "math"]
        code_names = [b for b in bench_order if kinds.get(b) == "code"]
        results[ckpt] = {"benchmarks": per, "math_avg": group_average(per, math_names),
                         "code_avg": group_average(per, code_names)}
    return {**(meta or {}), "checkpoints": list(groups), "benchmarks": bench_order,
            "kinds": {b: kinds.get(b, "?") for b in bench_order}, "results": results}


def _pct(m: dict | None, with_ci: bool = True) -> str:
    if not m or m.get("avg") is None or math.isnan(m["avg"]):
        return "–"
    if not with_ci:
        return f"{100 * m['avg']:.1f}"
    lo, hi = m["ci95"]
    return f"{100 * m['avg']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def render_markdown(summary: dict) -> str:
    """report.md: avg@k table (benchmarks × checkpoints), group averages, details per benchmark."""
    ck, benches, res = summary["checkpoints"], summary["benchmarks"], summary["results"]
    k = summary.get("k")
    lines = [f"# Evaluation report: {summary.get('run_id', '')}".rstrip(), ""]
    if summary.get("sampling"):
        s = summary["sampling"]
        lines.append(f"avg@{k} accuracy (%), with 95% intervals over the sampling noise; temperature "
                     f"{s.get('temperature')}, top-p {s.get('top_p')}, max {s.get('max_tokens')} tokens.")
        lines.append("")
    lines += ["| benchmark | " + " | ".join(ck) + " |", "|---|" + "---|" * len(ck)]
    for b in benches:
        lines.append(f"| {b} | " + " | ".join(_pct(res[c]["benchmarks"].get(b)) for c in ck) + " |")
    for key, label in (("math_avg", "**Math avg**"), ("code_avg", "**Code avg**")):
        if any(res[c].get(key) for c in ck):
            lines.append(f"| {label} | " + " | ".join(_pct(res[c].get(key)) for c in ck) + " |")
    lines += ["", f"![accuracy]({CHART})", "", "## Details", ""]
    lines += ["| checkpoint | benchmark | problems | samples | avg@k | SE | SE (problems) | pass@k | "
              "mean tokens | truncated | verdicts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in ck:
        for b in benches:
            m = res[c]["benchmarks"].get(b)
            if not m:
                continue
            pk = ", ".join(f"@{kk} {100 * v:.1f}" for kk, v in m["pass_at_k"].items())
            verd = ", ".join(f"{v} {n}" for v, n in m["verdicts"].items())
            sep = m["stderr_problems"]
            lines.append(f"| {c} | {b} | {m['problems']} | {m['samples']} | {100 * m['avg']:.1f} | "
                         f"{100 * m['stderr']:.2f} | {'–' if math.isnan(sep) else f'{100 * sep:.2f}'} | {pk} | "
                         f"{m['mean_tokens']:.0f} | {100 * m['truncation_rate']:.1f}% | {verd} |")
    lines += render_grading(summary.get("grading"))
    if summary.get("checkpoint_uris"):
        lines += ["", "## Checkpoints", ""]
        lines += [f"- **{c}**: `{u}`" for c, u in summary["checkpoint_uris"].items()]
    return "\n".join(lines) + "\n"


def render_grading(grading: dict | None) -> list[str]:
    """The "Grading rules" section: what decided correct, so two reports can be compared."""
    if not grading:
        return ["", "## Grading rules", "", "not recorded in this evaluation's manifest"]
    lines = ["", "## Grading rules", ""]
    for kind in sorted(grading):
        for key, val in grading[kind].items():
            lines.append(f"- **{kind}.{key}**: {val}")
    return lines


def render_chart(summary: dict, path: Path) -> None:
    """Grouped bar chart: one group per benchmark (and average), one bar per checkpoint, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ck, res = summary["checkpoints"], summary["results"]
    groups = list(summary["benchmarks"])
    for key, label in (("math_avg", "Math avg"), ("code_avg", "Code avg")):
        if any(res[c].get(key) for c in ck):
            groups.append(label)

    def metric(c: str, g: str) -> dict | None:
        if g == "Math avg":
            return res[c].get("math_avg")
        if g == "Code avg":
            return res[c].get("code_avg")
        return res[c]["benchmarks"].get(g)

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(ck))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(ck)) / 2 + 3), 4.5), dpi=100)
    for j, c in enumerate(ck):
        ms = [metric(c, g) for g in groups]
        vals = np.array([100 * m["avg"] if m else np.nan for m in ms])
        lo = np.array([100 * (m["avg"] - m["ci95"][0]) if m else 0 for m in ms])
        hi = np.array([100 * (m["ci95"][1] - m["avg"]) if m else 0 for m in ms])
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width, yerr=np.vstack([lo, hi]), capsize=3, label=c)
    ax.set_xticks(x, groups)
    ax.set_ylabel(f"avg@{summary.get('k', 'k')} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Evaluation {summary.get('run_id', '')} (95% intervals)".strip())
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _json_safe(x: Any) -> Any:
    """NaN (e.g. an undefined standard error) becomes null, so summary.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_report(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write summary.json, report.md and accuracy.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    (out / REPORT_MD).write_text(render_markdown(summary))
    render_chart(summary, out / CHART)
    return [out / SUMMARY, out / REPORT_MD, out / CHART]


# --------------------------------------------------------------------------- from the store


def read_eval_rows(store, stage_prefix: str) -> tuple[list[dict], dict]:
    """All per-sample rows of a published eval stage and its manifest's lineage; each part file
    is read from a copy verified against the manifest's digest and size."""
    import pyarrow.parquet as pq

    from lopd.manifest import ManifestError, read_manifest

    try:
        m, _ = read_manifest(store, stage_prefix)
    except ManifestError as e:
        raise ReportError(f"no published evaluation: {e}") from None
    rows: list[dict] = []
    for f in m.files:
        if f.path.endswith(".parquet"):
            with store.open_verified(f"{stage_prefix}/{f.path}", f.digest, f.bytes) as fh:
                rows.extend(pq.read_table(fh).to_pylist())
    return rows, m.lineage


def report_from_store(store, stage_prefix: str, out_dir: str | Path | None = None, publish: bool = True,
                      run_id: str = "") -> tuple[dict, Path]:
    """Summarise a published eval stage, write the report files locally and (``publish``) to
    ``<stage_prefix>/report/`` with their own manifest. Returns (summary, local dir)."""
    from lopd.manifest import publish as publish_dir
    from lopd.manifest import read_manifest

    rows, lineage = read_eval_rows(store, stage_prefix)
    _, stage_sha = read_manifest(store, stage_prefix)
    meta = {k: lineage[k] for k in ("run_id", "k", "sampling", "checkpoint_uris", "grading") if k in lineage}
    meta.setdefault("run_id", run_id)
    summary = summarize(rows, lineage.get("kinds", {}), meta)
    local = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lopd-report-"))
    write_report(summary, local)
    if publish:
        from lopd.manifest import InputRef

        publish_dir(store, report_prefix(stage_prefix), local, stage="eval-report",
                    run_id=meta["run_id"] or "unknown",
                    inputs={"eval": InputRef(uri=store.url(stage_prefix), manifest_sha256=stage_sha)},
                    metrics=_headline(summary))
    return summary, local


def _headline(summary: dict) -> dict:
    """Flat numeric metrics for the manifest: ``<checkpoint>/<benchmark>/avg`` etc."""
    out: dict[str, float] = {}
    for c, r in summary["results"].items():
        for b, m in r["benchmarks"].items():
            out[f"{c}/{b}/avg"] = m["avg"]
        for key in ("math_avg", "code_avg"):
            if r.get(key):
                out[f"{c}/{key}"] = r[key]["avg"]
    return out

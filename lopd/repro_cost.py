"""The cost columns of a ``lopd repro`` table: what each row's own runs spent, per seed.

    tokens   sampled (by the student; for sequence-level distillation, by the teacher), scored by
             the teacher, trained on
    seconds  sampling, scoring, training steps (from the stages' own measurements), and the
             total of every stage process the row needed, start-ups included (the local
             runner's ``logs/timings.jsonl``)

Sources, every published file read verified: the precompute manifests' metrics
(``response_tokens``, ``scored_tokens``, ``sample_s``, ``score_s``) and the training run's
``metrics.jsonl`` (per step ``response_tokens``, or ``target_tokens`` for SFT, and
``step_time_s``; online OPD also ``sync_s``, ``sample_s`` and ``score_s``, and samples and
scores exactly the tokens it trains on). An offline row on the shared rollouts is charged the
whole shared precompute, as if it ran alone; a row with Lightning rounds is charged every round;
sequence-level distillation is charged the teacher's answers to the OPD prompts (the ``sft-data``
manifest: ``response_tokens``, ``sample_s``); the SFT row has no cost and the SFT control only its
training. A quantity that cannot be known
(a manifest without the metric, a stage process the timings file does not record, as after a
study resumed on another machine) is None. ``study`` is a :class:`lopd.repro.Study`.
"""

from __future__ import annotations

import json
from typing import Any

from lopd.layout import local_run_dir, run_logs_dir, stage_prefix
from lopd.manifest import read_manifest, read_verified
from lopd.repro_results import SFT_ROW
from lopd.stages import instance

QUANTITIES = ("sampled_tokens", "scored_tokens", "trained_tokens", "sample_s", "score_s", "train_s", "total_s")
"""The cost of one row and seed, in the table's order."""


def train_steps(store, run_id: str, stage: str) -> list[dict[str, Any]]:
    """The per-step records of a training run's ``metrics.jsonl`` (read verified against its manifest)."""
    text = read_verified(store, stage_prefix(run_id, stage), "metrics.jsonl").decode()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _add(*xs: float | None) -> float | None:
    """The sum, or None when any term is unknown."""
    return None if any(x is None for x in xs) else float(sum(xs))


def timed_seconds(store_root: str, run_id: str, stage: str) -> float | None:
    """Wall seconds of every process of one stage instance of a local run, start-ups included
    (the runner's timings file; reruns after a kill all count); None when none is recorded."""
    from lopd.runner import TIMINGS

    path = run_logs_dir(local_run_dir(store_root, run_id)) / TIMINGS
    if not path.is_file():
        return None
    total, found = 0.0, False
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that process's cost is not known
        if not isinstance(rec, dict) or rec.get("stage") != stage or str(rec.get("label", "")).startswith("bootstrap"):
            continue
        if isinstance(rec.get("seconds"), (int, float)):
            total, found = total + rec["seconds"], True
    return total if found else None


def charged_precomputes(study: Any, name: str, seed: int) -> list[tuple[str, str]]:
    """``(run id, stage instance)`` of every inference stage a row is charged: its own precompute
    rounds; the shared precompute (the recipe's, or another teacher's) in full; the teacher's
    answers to the OPD prompts (``sft-data``) for sequence-level distillation; or none."""
    if study.owns_rollouts(name):
        return [(study.row_run(name, seed), instance("precompute", r)) for r in range(1, study.rounds(name) + 1)]
    v = study.cfg.variants[name]
    if v.stage == "sft":
        return [(study.run_id("kd"), "sft-data")] if v.sft_data == "opd" else []
    return [(study.rollouts_run(name, seed), "precompute")] if study.shares_rollouts(name) else []


def training_instances(study: Any, name: str, seed: int) -> list[tuple[str, str]]:
    """``(run id, stage instance)`` of every training process a row ran (each Lightning round's)."""
    rid, stage = study.row_run(name, seed), study.stage(name)
    if stage == "sft":
        return [(rid, "sft")]
    return [(rid, instance("opd", r)) for r in range(1, study.rounds(name) + 1)]


def row_cost(study: Any, name: str, seed: int) -> dict[str, float | None]:
    """One row's cost for one seed (:data:`QUANTITIES`)."""
    out: dict[str, float | None] = {"sampled_tokens": 0.0, "scored_tokens": 0.0, "sample_s": 0.0, "score_s": 0.0}
    for rid, stage in charged_precomputes(study, name, seed):
        m, _ = read_manifest(study.store, stage_prefix(rid, stage))
        metrics = m.metrics if stage != "sft-data" else {"scored_tokens": 0, "score_s": 0, **m.metrics}
        for q, key in (("sampled_tokens", "response_tokens"), ("scored_tokens", "scored_tokens"),
                       ("sample_s", "sample_s"), ("score_s", "score_s")):
            out[q] = _add(out[q], metrics.get(key))
    steps = train_steps(study.store, study.row_run(name, seed), study.stage(name))
    trained = float(sum(s.get("response_tokens", s.get("target_tokens", 0)) for s in steps))
    out["trained_tokens"] = trained
    out["train_s"] = float(sum(s.get("step_time_s", 0.0) for s in steps))
    if study.stage(name) != "sft" and study.opd(name).get("mode", "offline") == "online":
        out["sampled_tokens"], out["scored_tokens"] = trained, trained  # it samples and scores what it trains on
        out["sample_s"] = float(sum(s.get("sample_s", 0.0) + s.get("sync_s", 0.0) for s in steps))
        out["score_s"] = float(sum(s.get("score_s", 0.0) for s in steps))
    needed = charged_precomputes(study, name, seed) + training_instances(study, name, seed)
    out["total_s"] = _add(*(timed_seconds(study.recipe.store, rid, stage) for rid, stage in needed))
    return {q: None if out[q] is None else round(out[q], 3) for q in QUANTITIES}


def row_costs(study: Any, name: str) -> dict[str, dict[str, Any]] | None:
    """A row's cost: per quantity, the value for each seed and their mean (None where any seed's
    is unknown); None for the SFT row."""
    if name == SFT_ROW:
        return None
    per_seed = {str(seed): row_cost(study, name, seed) for seed in study.cfg.seeds}
    out = {}
    for q in QUANTITIES:
        values = {s: c[q] for s, c in per_seed.items()}
        known = [v for v in values.values() if v is not None]
        out[q] = {"seeds": values, "mean": round(sum(known) / len(known), 3) if len(known) == len(values) else None}
    return out


__all__ = ["QUANTITIES", "charged_precomputes", "row_cost", "row_costs", "timed_seconds", "train_steps",
           "training_instances"]

"""Choosing each row's settings on the validation split (``repro.selection``), never on the test split.

    for each row, on the selection seed (the first of repro.seeds):
        candidates = the product of the grid (the study's, with the row's own keys replacing)
        train every candidate; candidates that differ only in ``train.steps`` share one run of the
            most updates when it has one round and a constant learning rate without warm-up (the
            weights after s updates are then what an s-update run ends with: its checkpoint)
    evaluate every candidate on the validation benchmark     (one eval run, <run>-val<digest>-s<seed>)
    choose per row: the highest validation accuracy; ties go to the earlier candidate

The chosen settings then make every seed's test run (:meth:`lopd.repro.Study.variant`), and only
those are evaluated on the test split. The grid is the same for every row (a variant's ``grid``
replaces keys, e.g. to keep a regime's update count), so no method is tuned more than another.
``study`` is a :class:`lopd.repro.Study`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from typing import Any

from lopd.layout import checkpoint_prefix, report_prefix, stage_prefix
from lopd.repro_results import ReproError

STEPS = "train.steps"
"""The grid key of a row's number of updates."""
SFT_KEYS = ("optim", "train")
"""The sections of a grid key that apply to the SFT rows (``stage: sft``)."""


def merge(base: dict, change: dict) -> dict:
    """A deep copy of ``base`` with ``change`` merged in (nested dicts merged key by key)."""
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def nested(settings: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested dicts: ``{"optim.lr": 1e-4}`` -> ``{"optim": {"lr": 1e-4}}``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def digest(settings: dict[str, Any]) -> str:
    """Four hex digits naming a set of settings in run ids (``<run>-<row>-<digest>-s<seed>``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:4]


def grid(study: Any, name: str) -> dict[str, list[Any]]:
    """A row's grid: the study's with the variant's keys replacing; an SFT row keeps only the
    ``optim.*`` and ``train.*`` keys (the rest are OPD settings it does not have)."""
    v = study.cfg.variants[name]
    g = {**study.cfg.selection.grid, **v.grid}
    if v.stage == "sft":
        g = {k: vals for k, vals in g.items() if k.split(".")[0] in SFT_KEYS}
    return g


def candidates(study: Any, name: str) -> list[dict[str, Any]]:
    """Every candidate setting of a row (dotted key -> value), the grid's product in its order."""
    g = grid(study, name)
    return [dict(zip(g, values, strict=True)) for values in itertools.product(*g.values())]


def settings_space(study: Any, name: str) -> list[dict[str, Any]]:
    """A row's candidates, or only the recipe's settings (``{}``) without a selection."""
    return candidates(study, name) if study.cfg.selection else [{}]


def checkpoint_every(study: Any, name: str) -> int | None:
    """The checkpoint interval of every run of a row whose grid has ``train.steps``: the recipe's
    reduced until it divides each candidate (so each has a checkpoint); None otherwise. Every run of
    the row uses it, so a test run with a selection run's settings is that very run."""
    if study.cfg.selection is None or STEPS not in grid(study, name):
        return None
    return math.gcd(int(study.base["opd"]["train"]["checkpoint_every"]), *(int(s) for s in grid(study, name)[STEPS]))


def shares_checkpoints(study: Any, name: str, settings: dict[str, Any]) -> bool:
    """Whether the weights after s updates of a run with ``settings`` are those an s-update run
    ends with: one round, and a constant learning rate without warm-up (the data order and the
    sampling of step t depend on t alone)."""
    optim = study.opd(name, settings)["optim"]
    return study.rounds(name, settings) == 1 and optim["schedule"] == "constant" and not optim["warmup_ratio"]


def runs(study: Any, name: str) -> list[tuple[dict[str, Any], list[tuple[int, int]]]]:
    """The selection seed's runs of a row: ``(the run's settings, [(candidate index, the update
    count it is validated at)])``, candidates differing only in ``train.steps`` sharing one run
    where :func:`shares_checkpoints` allows."""
    cands = candidates(study, name)
    out: dict[str, tuple[dict[str, Any], list[tuple[int, int]]]] = {}
    for i, c in enumerate(cands):
        run = c
        if STEPS in c and shares_checkpoints(study, name, c):
            rest = {k: v for k, v in c.items() if k != STEPS}
            run = {**c, STEPS: max(int(d[STEPS]) for d in cands if {k: v for k, v in d.items() if k != STEPS} == rest)}
        steps = int(study.opd(name, c)["train"]["steps"])
        out.setdefault(digest(run), (run, []))[1].append((i, steps))
    return list(out.values())


def label(name: str, index: int) -> str:
    """The validation eval's label of a row's candidate."""
    return f"{name}-{index}"


def checkpoints(study: Any, seed: int) -> list[str]:
    """``label=reference`` of every candidate of every row on the selection seed: its run's final
    checkpoint, or the resumable checkpoint after the candidate's update count."""
    out = []
    for name in study.variants:
        for settings, members in runs(study, name):
            prefix = stage_prefix(study.row_run(name, seed, settings), study.stage(name, settings))
            total = int(study.opd(name, settings)["train"]["steps"])
            for i, steps in members:
                where = prefix if steps == total else checkpoint_prefix(prefix, steps)
                out.append(f"{label(name, i)}={study.store.url(where)}")
    return out


def validation(study: Any, seed: int):
    """The eval run of every candidate on the validation benchmark: the recipe's eval with
    ``repro.selection.eval`` changes, its one benchmark's file replaced by the validation file."""
    sel = study.cfg.selection
    data = study.only(study.base)
    ev = merge(data["eval"], sel.eval)
    if len(ev["benchmarks"]) != 1:
        raise ReproError(f"repro.selection: the eval needs exactly one benchmark to validate, got {ev['benchmarks']}")
    bench = ev["benchmarks"][0]
    refs = checkpoints(study, seed)
    if ev["inference"]["backend"] == "vllm" and any("/checkpoints/step-" in r for r in refs):
        raise ReproError("repro.selection.eval: candidates validated at intermediate checkpoints need inference."
                         "backend hf (a resumable checkpoint also holds optimizer.safetensors, which vLLM would load "
                         "as weights)")
    ev["datasets"] = {**ev["datasets"], bench: {**ev["datasets"][bench], "path": sel.validation}}
    data["eval"] = merge(ev, {"checkpoints": refs, "sampling": {"seed": seed}})
    digest6 = hashlib.sha256("\n".join(refs + [json.dumps(ev, sort_keys=True)]).encode()).hexdigest()[:6]
    rid = study.run_id(f"val{digest6}", seed)
    return study.write(rid, data)


def choose(study: Any, seed: int) -> dict[str, dict[str, Any]]:
    """Per row: every candidate's settings and validation accuracy, and the chosen settings (the
    highest accuracy, ties to the earlier candidate), from the validation run's published summary."""
    from lopd.manifest import read_verified_json

    prefix = report_prefix(stage_prefix(validation(study, seed)[0].run_id, "eval"))
    summary = read_verified_json(study.store, prefix, "summary.json")
    bench = summary["benchmarks"][0]
    out = {}
    for name in study.variants:
        cands = candidates(study, name)
        accs = [summary["results"][label(name, i)]["benchmarks"][bench]["avg"] for i in range(len(cands))]
        best = max(range(len(cands)), key=lambda i: (accs[i], -i))
        out[name] = {"chosen": cands[best], "candidates": [{"settings": c, "validation": a}
                                                           for c, a in zip(cands, accs, strict=True)]}
    return out


__all__ = ["STEPS", "candidates", "checkpoint_every", "checkpoints", "choose", "digest", "grid", "label", "merge",
           "nested", "runs", "settings_space", "shares_checkpoints", "validation"]

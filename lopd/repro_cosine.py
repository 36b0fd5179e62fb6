"""The offline-vs-online gradient cosine of a ``lopd repro`` study (``repro.grad_cosine``).

    for each named row, on the first seed: its test run again with ``opd.grad_discrepancy_every``
        (run <run>-<row>-cos[-<digest>]-s<seed>: the same updates; the diagnostic only reads weights)
    per measured step: the cosine between the OPD gradient on the stored rollouts and on fresh
        rollouts of the same prompts from the current student, and their norm ratio
    results.json ``grad_cosine``; grad-cosine.png (:func:`lopd.repro_plots.write_grad_cosine`)

The diagnostic itself is :mod:`lopd.train.diagnostic`. ``study`` is a :class:`lopd.repro.Study`.
"""

from __future__ import annotations

from typing import Any

from lopd.repro_plots import COSINE_KEYS
from lopd.repro_results import ReproError
from lopd.repro_select import digest, settings_space


def rows(study: Any) -> list[str]:
    """The rows measured (``repro.grad_cosine.rows`` among the study's rows)."""
    return [n for n in (study.cfg.grad_cosine.rows if study.cfg.grad_cosine else []) if n in study.variants]


def check(study: Any) -> None:
    """Refuse a named row that does not train offline on its seed's shared rollouts (one line)."""
    for name in rows(study):
        study.run_id(f"{name}-cos" + ("-0000" if study.cfg.selection else ""), max(study.cfg.seeds))
        if not all(study.shares_rollouts(name, c) for c in settings_space(study, name)):
            raise ReproError(f"repro.grad_cosine.rows: {name!r} does not train offline on its seed's shared rollouts")


def run_id(study: Any, name: str, seed: int) -> str:
    return study.run_id(f"{name}-cos" + (f"-{digest(study.settings(name))}" if study.cfg.selection else ""), seed)


def recipe(study: Any, name: str, seed: int):
    """A row's test run with ``opd.grad_discrepancy_every`` on."""
    data = study.variant_data(name, seed)
    data["opd"] = {**data["opd"], "grad_discrepancy_every": study.cfg.grad_cosine.every}
    return study.write(run_id(study, name, seed), data)


def series(study: Any, seed: int) -> dict[str, dict[str, list[float]]] | None:
    """Per row, the measured steps with their cosine and norm ratio (read verified)."""
    from lopd.repro_cost import train_steps

    if not rows(study):
        return None
    out = {}
    for name in rows(study):
        steps = [s for s in train_steps(study.store, run_id(study, name, seed), "opd") if COSINE_KEYS[0] in s]
        out[name] = {"step": [float(s["step"]) for s in steps],
                     **{k: [float(s[k]) for s in steps] for k in COSINE_KEYS}}
    return out

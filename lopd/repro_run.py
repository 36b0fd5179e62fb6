"""Running a ``lopd repro`` study (the runs :class:`lopd.repro.Study` derives, in order) and
collecting its results; see :mod:`lopd.repro` for the study's shape."""

from __future__ import annotations

import time
from typing import Any

from lopd import repro_cosine
from lopd.layout import report_prefix, stage_prefix
from lopd.manifest import read_verified_json
from lopd.recipe import load_recipe
from lopd.repro import Study
from lopd.repro_cost import row_costs, train_steps
from lopd.repro_plots import mean_series
from lopd.repro_results import SFT_ROW, mean_ci, paired, write_results
from lopd.repro_select import choose, runs, settings_space, validation


def _teachers_to_precompute(study: Study) -> list[str]:
    """Other teachers that score a seed's shared rollouts (for an offline row on them)."""
    return [t for t in dict.fromkeys(v.teacher for v in study.variants.values() if v.teacher)
            if any(v.teacher == t and study.shares_rollouts(n, c) for n, v in study.variants.items()
                   for c in settings_space(study, n))]


def run(recipe_path: str, overrides: tuple[str, ...] = (), seeds: list[int] | None = None, nproc: int = 1,
        console=None) -> dict:
    """Run (or resume) the whole study; returns the results (also written beside the runs)."""
    from rich.console import Console

    from lopd.bootstrap import init_student
    from lopd.runner import run_bootstrap, run_stages

    console = console or Console(stderr=True)
    recipe = load_recipe(recipe_path, overrides)
    if seeds:
        recipe = recipe.model_copy(update={"repro": recipe.repro.model_copy(update={"seeds": seeds})}) \
            if recipe.repro else recipe
    study = Study(recipe, console)
    t0 = time.monotonic()

    def stages(r_f: tuple, names: list[str]) -> None:
        run_stages(r_f[0], r_f[1], names, (), nproc, console)

    run_bootstrap(recipe, nproc, console)
    run_stages(recipe, recipe_path, ["sft-data", "sft", "precompute"], overrides, nproc, console)
    for name in dict.fromkeys(v.teacher for v in study.variants.values() if v.teacher):
        run_bootstrap(study.teacher(name)[0], nproc, console)
    if any(v.stage == "sft" and v.sft_data == "opd" for v in study.variants.values()):
        stages(study.kd_data(), ["sft-data"])
    for i, seed in enumerate(study.cfg.seeds):
        if study.offset(seed):
            init_student(recipe, study.student_init(seed), study.offset(seed))
            stages(study.seed_base(seed), ["sft", "precompute"])
        for name in _teachers_to_precompute(study):
            stages(study.teacher_precompute(name, seed), ["precompute"])
        if i == 0 and study.cfg.selection:
            select(study, seed, stages)
        for name in study.variants:
            r, f = study.variant(name, seed)
            stages((r, f), study.stages(name, r))
        for name in repro_cosine.rows(study) if i == 0 else []:
            stages(repro_cosine.recipe(study, name, seed), ["opd"])
        stages(study.evaluation(seed), ["eval"])
    results = collect(study)
    write_results(study.dir, results)
    console.print(f"repro done in {time.monotonic() - t0:.0f}s")
    print((study.dir / "results.md").read_text())
    console.print(f"results: {study.dir / 'results.json'}, chart: {study.dir / 'results.png'}")
    return results


def select(study: Study, seed: int, stages) -> None:
    """Train every row's candidates on ``seed``, evaluate them on the validation split and set
    ``study.chosen`` (:mod:`lopd.repro_select`)."""
    for name in study.variants:
        for settings, _ in runs(study, name):
            r, f = study.variant(name, seed, settings)
            stages((r, f), study.stages(name, r, settings))
    stages(validation(study, seed), ["eval"])
    study.chosen = {name: row["chosen"] for name, row in choose(study, seed).items()}
    for name, settings in study.chosen.items():
        study.console.print(f"repro: {name} chose {settings or 'the recipe settings'} on the validation split")


# ---------------------------------------------------------------------- results


def _train_seconds(steps: list[dict[str, Any]]) -> float:
    """Seconds one run spent in its training loop: per step, the update plus (online OPD) the
    weight sync, the sampling and the teacher's scoring."""
    keys = ("step_time_s", "sync_s", "sample_s", "score_s")
    return sum(sum(step.get(k, 0.0) for k in keys) for step in steps)


def collect(study: Study) -> dict[str, Any]:
    """Accuracy per row and seed from the eval summaries, training time per OPD run, each row's
    cost (:mod:`lopd.repro_cost`), training diagnostics (:mod:`lopd.repro_plots`) and, with a
    selection, every candidate's validation accuracy and the chosen settings; every file read
    verified against its stage's manifest."""
    selection = choose(study, study.cfg.seeds[0]) if study.cfg.selection else None
    if selection:
        study.chosen = {name: row["chosen"] for name, row in selection.items()}
    rows: dict[str, dict[str, Any]] = {SFT_ROW: {"acc": {}, "train_s": {}}}
    rows.update({n: {"acc": {}, "train_s": {}} for n in study.variants})
    steps: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in study.variants}
    bench = None
    for seed in study.cfg.seeds:
        report = report_prefix(stage_prefix(study.eval_run_id(seed), "eval"))
        s = read_verified_json(study.store, report, "summary.json")
        bench = bench or s["benchmarks"][0]
        for name in rows:
            rows[name]["acc"][str(seed)] = s["results"][name]["benchmarks"][bench]["avg"]
            if name != SFT_ROW:
                steps[name].append(train_steps(study.store, study.row_run(name, seed), study.stage(name)))
                rows[name]["train_s"][str(seed)] = _train_seconds(steps[name][-1])
                rows[name]["updates"] = len(steps[name][-1])
    for name, r in rows.items():
        r["accuracy"] = mean_ci(list(r["acc"].values()))
        r["train_seconds"] = mean_ci(list(r["train_s"].values())) if r["train_s"] else None
        r["stage"] = study.stage(name)
        v = study.cfg.variants.get(name)
        for key in ("opd", "teacher", "precompute", "sft_data"):
            r[key] = getattr(v, key) if v else None
        r["settings"] = study.chosen.get(name) if selection and name != SFT_ROW else None
        r["cost"] = row_costs(study, name)
        r["vs_sft"] = None if name == SFT_ROW else paired(r["acc"], rows[SFT_ROW]["acc"])
        r["diagnostics"] = mean_series(steps[name]) if name in steps else None
    opd = study.recipe.opd
    return {"run_id": study.recipe.run_id, "benchmark": bench, "seeds": study.cfg.seeds,
            "independent_seeds": study.cfg.independent_seeds,
            "opd_steps": opd.train.steps, "global_batch": opd.train.global_batch, "lr": opd.optim.lr,
            "eval_k": study.recipe.eval.k, "rows": rows, "grad_cosine": repro_cosine.series(study, study.cfg.seeds[0]),
            "selection": None if selection is None else {
                "seed": study.cfg.seeds[0], "validation": study.cfg.selection.validation,
                "grid": study.cfg.selection.grid, "rule": "highest validation accuracy; ties to the earlier candidate",
                "rows": selection}}

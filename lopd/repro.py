"""``lopd repro``: the paper's comparison at toy scale, from one recipe with a ``repro`` section.

    bootstrap teacher A; sft-data → sft → precompute            (the recipe's own run, once)
    for each other teacher a variant names (repro.teachers): bootstrap it (run <run>-t-<name>),
        and, for offline variants on the shared rollouts, precompute the SFT student's rollouts
        scored by it                                              (run <run>-p-<name>)
    if a variant needs it: teacher A answers the OPD prompts     (run <run>-kd, sft-data)
    for seed in seeds:
        for variant in the selected variants (``repro.rows``):  (run <run>-<variant>-s<seed>)
            opd from the SFT checkpoint on the shared rollouts, or, for a variant that owns its
            rollouts (``precompute`` changes or ``opd.rounds`` > 1), its own precompute and opd
            instances (precompute, opd, precompute-r2, opd-r2, ...) from the SFT checkpoint,
            or, for a ``stage: sft`` variant, sft continued from it on the SFT data (the
            same-compute control) or on <run>-kd (sequence-level distillation)
        eval the SFT checkpoint and every variant               (run <run>-eval<digest>-s<seed>)
    results.json, results.md (mean and 95% interval over seeds, paired Δ vs SFT, cost per row),
    results.png, diagnostics.png (KL to SFT and the reverse-KL estimate per step, per row)

Every variant starts from the same SFT checkpoint and makes the same number of updates on
the same batch size ("same compute per method"); the other offline variants share the
precomputed rollouts. Each run is an ordinary stage run with a derived recipe (written under
``runs/<run>/repro/recipes``), so a killed study resumes where it stopped.
:func:`check` compares a results file with an expected-results file.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import yaml

from lopd.layout import local_run_dir, report_prefix, repro_dir, stage_prefix, teacher_sft_prefix
from lopd.manifest import read_verified_json
from lopd.recipe import Recipe, load_recipe
from lopd.repro_cost import row_costs, train_steps
from lopd.repro_plots import mean_series
from lopd.repro_results import SFT_ROW, ReproError, mean_ci, paired, write_results
from lopd.stages import instance, stages_of
from lopd.store import open_store


def _merge(base: dict, change: dict) -> dict:
    """A deep copy of ``base`` with ``change`` merged in (nested dicts merged key by key)."""
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class Study:
    """Derived recipes and run ids of one repro study."""

    def __init__(self, recipe: Recipe, console):
        if recipe.repro is None:
            raise ReproError("repro: the recipe has no 'repro' section (see jobs/recipes/tiny.yaml)")
        if recipe.precompute is None or recipe.sft_data is None:
            raise ReproError("repro: the recipe needs sft_data and precompute sections")
        self.recipe, self.cfg, self.console = recipe, recipe.repro, console
        self.store = open_store(recipe.store)
        self.dir = repro_dir(local_run_dir(recipe.store, recipe.run_id))
        self.base = recipe.model_dump(mode="json", exclude={"repro"})
        self.variants = self.cfg.selected()
        """The variants this study runs and tabulates (``repro.rows``), in the variants' order."""
        for name in self.variants:
            self.run_id(name, max(self.cfg.seeds))  # fails early when too long

    def run_id(self, name: str, seed: int | None = None) -> str:
        rid = f"{self.recipe.run_id}-{name}" + ("" if seed is None else f"-s{seed}")
        if len(rid) > 40:
            raise ReproError(f"repro: run id {rid!r} is longer than 40 characters (shorten run_id or the variant)")
        return rid

    def uri(self, run_id: str, stage: str) -> str:
        return self.store.url(stage_prefix(run_id, stage))

    def write(self, run_id: str, data: dict) -> tuple[Recipe, Path]:
        """Validate a derived recipe and write it; returns it and its file."""
        from lopd.recipe import validate_recipe

        data = {**data, "run_id": run_id}
        recipe = validate_recipe(data, f"repro recipe {run_id}")
        path = self.dir / "recipes" / f"{run_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return recipe, path

    def only(self, data: dict, *sections: str) -> dict:
        """A derived recipe without a bootstrap and without the inference stages it does not run."""
        data = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("bootstrap", "sft_data", "precompute")}
        for s in ("sft_data", "precompute"):
            if s in sections:
                data[s] = self.base[s]
        return data

    # ------------------------------------------------------------------ the runs

    def teacher(self, name: str) -> tuple[Recipe, Path]:
        """The bootstrap recipe of another teacher (``repro.teachers``): teacher A's with its changes."""
        t, rid = self.cfg.teachers[name], self.run_id(f"t-{name}")
        change = {"teacher_style": t.style, "teacher_draw": t.draw}
        if t.seed is not None:
            change["teacher_sft"] = {"train": {"seed": t.seed}}
        b = _merge(self.base, {"run_id": rid, "bootstrap": change})
        b["models"]["teacher"] = {"uri": teacher_sft_prefix(rid)}
        return self.write(rid, b)

    def teacher_precompute(self, name: str) -> tuple[Recipe, Path]:
        """The shared rollouts (the recipe's precompute from the SFT checkpoint) scored by another teacher."""
        data = self.only(self.base, "precompute")
        data["models"] = {**data["models"], "teacher": self.teacher(name)[0].models.teacher.model_dump(mode="json")}
        data["precompute"] = {**data["precompute"], "student": self.uri(self.recipe.run_id, "sft")}
        data["allow_inconsistent_teacher"] = True
        return self.write(self.run_id(f"p-{name}"), data)

    def kd_data(self) -> tuple[Recipe, Path]:
        """Teacher A's answers to the OPD prompts (the sft-data stage, sampled like the SFT data): the
        data of sequence-level distillation on OPD's prompt budget."""
        data = self.only(self.base, "sft_data")
        data["sft_data"] = {**data["sft_data"], "prompts": self.base["precompute"]["prompts"]}
        return self.write(self.run_id("kd"), data)

    def opd(self, name: str) -> dict:
        """The recipe's ``opd`` section with the variant's changes merged in."""
        return _merge(self.base["opd"], self.cfg.variants[name].opd)

    def rounds(self, name: str) -> int:
        """Lightning rounds of a variant's OPD (1 for the SFT row, the control and online OPD)."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft":
            return 1
        opd = self.opd(name)
        return int(opd.get("rounds", 1)) if opd.get("mode", "offline") == "offline" else 1

    def owns_rollouts(self, name: str) -> bool:
        """Whether a variant samples and scores its own rollouts (``precompute`` changes or
        Lightning rounds) instead of sharing the recipe's precompute."""
        if name == SFT_ROW:
            return False
        v = self.cfg.variants[name]
        return v.stage == "opd" and (bool(v.precompute) or self.rounds(name) > 1)

    def shares_rollouts(self, name: str) -> bool:
        """Whether a variant trains offline on a shared precompute (:meth:`rollouts_run`'s)."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft" or self.owns_rollouts(name):
            return False
        return self.opd(name).get("mode", "offline") == "offline"

    def rollouts_run(self, name: str) -> str:
        """The run whose precompute a variant on the shared rollouts trains on: the recipe's, or
        for a variant another teacher scores, that teacher's (``<run>-p-<teacher>``)."""
        teacher = self.cfg.variants[name].teacher
        return self.run_id(f"p-{teacher}") if teacher else self.recipe.run_id

    def stage(self, name: str) -> str:
        """The stage instance that made a row's final checkpoint: ``opd`` (the last round's,
        ``opd-r<R>``, for Lightning rounds), or ``sft`` for the control."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft":
            return "sft"
        return instance("opd", self.rounds(name))

    def stages(self, name: str, recipe: Recipe) -> list[str]:
        """The stage instances a variant's run runs (its derived ``recipe``): the training stage,
        or, for a variant that owns its rollouts, every precompute and opd round in order."""
        if self.owns_rollouts(name):
            return [s for s in stages_of(recipe) if s not in ("sft-data", "sft", "eval")]
        return [self.stage(name)]

    def sft_control(self, name: str, seed: int) -> dict:
        """SFT continued from the SFT checkpoint with the OPD rows' updates, batch size and optimizer,
        on the study's SFT data (what the same compute buys without OPD) or on teacher A's answers
        to the OPD prompts (sequence-level distillation)."""
        data = self.only(self.base)
        data["models"] = {**data["models"], "student": {"uri": self.uri(self.recipe.run_id, "sft")}}
        source = self.run_id("kd") if self.cfg.variants[name].sft_data == "opd" else self.recipe.run_id
        data["sft"] = {**data["sft"], "data": stage_prefix(source, "sft-data"),
                       "optim": data["opd"]["optim"], "train": _merge(data["opd"]["train"], {"seed": seed})}
        return data

    def variant(self, name: str, seed: int) -> tuple[Recipe, Path]:
        v = self.cfg.variants[name]
        if v.stage == "sft":
            return self.write(self.run_id(name, seed), self.sft_control(name, seed))
        own, sft = self.owns_rollouts(name), self.uri(self.recipe.run_id, "sft")
        data = self.only(self.base, *(("precompute",) if own else ()))
        opd = _merge(self.opd(name), {"student": sft, "train": {"seed": seed}, "online": {"sampling": {"seed": seed}}})
        if own:  # its own precompute rounds, sampled from the shared SFT checkpoint
            data["precompute"] = _merge(_merge(data["precompute"], v.precompute), {"student": sft})
            opd.pop("rollouts", None)
        else:
            opd["rollouts"] = stage_prefix(self.rollouts_run(name), "precompute")
        opd["online"]["prompts"] = opd["online"].get("prompts") or self.base["precompute"]["prompts"]
        data["opd"] = opd
        if v.teacher:  # another teacher scores (offline: its precompute; online: live)
            data["models"] = {**data["models"],
                              "teacher": self.teacher(v.teacher)[0].models.teacher.model_dump(mode="json")}
            data["allow_inconsistent_teacher"] = True
        return self.write(self.run_id(name, seed), data)

    def checkpoints(self, seed: int) -> list[str]:
        ckpts = [f"{SFT_ROW}={self.uri(self.recipe.run_id, 'sft')}"]
        return ckpts + [f"{n}={self.uri(self.run_id(n, seed), self.stage(n))}" for n in self.variants]

    def eval_run_id(self, seed: int) -> str:
        """``<run>-eval<digest>-s<seed>``: the digest of the checkpoint list, so that adding a variant
        to a finished study evaluates again instead of reusing a table that lacks it."""
        digest = hashlib.sha256("\n".join(self.checkpoints(seed)).encode()).hexdigest()[:6]
        return self.run_id(f"eval{digest}", seed)

    def evaluation(self, seed: int) -> tuple[Recipe, Path]:
        data = self.only(self.base)
        data["eval"] = _merge(data["eval"], {"checkpoints": self.checkpoints(seed), "sampling": {"seed": seed}})
        return self.write(self.eval_run_id(seed), data)


def run(recipe_path: str, overrides: tuple[str, ...] = (), seeds: list[int] | None = None, nproc: int = 1,
        console=None) -> dict:
    """Run (or resume) the whole study; returns the results (also written beside the runs)."""
    from rich.console import Console

    from lopd.runner import run_bootstrap, run_stages

    console = console or Console(stderr=True)
    recipe = load_recipe(recipe_path, overrides)
    if seeds:
        recipe = recipe.model_copy(update={"repro": recipe.repro.model_copy(update={"seeds": seeds})}) \
            if recipe.repro else recipe
    study = Study(recipe, console)
    t0 = time.monotonic()
    run_bootstrap(recipe, nproc, console)
    run_stages(recipe, recipe_path, ["sft-data", "sft", "precompute"], overrides, nproc, console)
    for name in dict.fromkeys(v.teacher for v in study.variants.values() if v.teacher):
        run_bootstrap(study.teacher(name)[0], nproc, console)
        if any(v.teacher == name and study.shares_rollouts(n) for n, v in study.variants.items()):
            r, f = study.teacher_precompute(name)
            run_stages(r, f, ["precompute"], (), nproc, console)
    if any(v.stage == "sft" and v.sft_data == "opd" for v in study.variants.values()):
        r, f = study.kd_data()
        run_stages(r, f, ["sft-data"], (), nproc, console)
    for seed in study.cfg.seeds:
        for name in study.variants:
            r, f = study.variant(name, seed)
            run_stages(r, f, study.stages(name, r), (), nproc, console)
        r, f = study.evaluation(seed)
        run_stages(r, f, ["eval"], (), nproc, console)
    results = collect(study)
    write_results(study.dir, results)
    console.print(f"repro done in {time.monotonic() - t0:.0f}s")
    print((study.dir / "results.md").read_text())
    console.print(f"results: {study.dir / 'results.json'}, chart: {study.dir / 'results.png'}")
    return results


# ---------------------------------------------------------------------- results


def _train_seconds(steps: list[dict[str, Any]]) -> float:
    """Seconds one run spent in its training loop: per step, the update plus (online OPD) the
    weight sync, the sampling and the teacher's scoring."""
    keys = ("step_time_s", "sync_s", "sample_s", "score_s")
    return sum(sum(step.get(k, 0.0) for k in keys) for step in steps)


def collect(study: Study) -> dict[str, Any]:
    """Accuracy per row and seed from the eval summaries, training time per OPD run, each row's
    cost (:mod:`lopd.repro_cost`) and training diagnostics (:mod:`lopd.repro_plots`); every file
    read verified against its stage's manifest."""
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
                steps[name].append(train_steps(study.store, study.run_id(name, seed), study.stage(name)))
                rows[name]["train_s"][str(seed)] = _train_seconds(steps[name][-1])
                rows[name]["updates"] = len(steps[name][-1])
    for name, r in rows.items():
        r["accuracy"] = mean_ci(list(r["acc"].values()))
        r["train_seconds"] = mean_ci(list(r["train_s"].values())) if r["train_s"] else None
        r["stage"] = study.stage(name)
        v = study.cfg.variants.get(name)
        for key in ("opd", "teacher", "precompute", "sft_data"):
            r[key] = getattr(v, key) if v else None
        r["cost"] = row_costs(study, name)
        r["vs_sft"] = None if name == SFT_ROW else paired(r["acc"], rows[SFT_ROW]["acc"])
        r["diagnostics"] = mean_series(steps[name]) if name in steps else None
    opd = study.recipe.opd
    return {"run_id": study.recipe.run_id, "benchmark": bench, "seeds": study.cfg.seeds,
            "opd_steps": opd.train.steps, "global_batch": opd.train.global_batch, "lr": opd.optim.lr,
            "eval_k": study.recipe.eval.k, "rows": rows}

"""``lopd repro``: the paper's comparison at toy scale, from one recipe with a ``repro`` section.

    bootstrap teacher A; sft-data → sft → precompute            (the recipe's own run, once)
    if a variant needs it: bootstrap teacher B (other solution style), then
        precompute the same SFT student's rollouts scored by B  (run <run>-incons)
    for seed in seeds:
        for variant in variants: opd from the SFT checkpoint    (run <run>-<variant>-s<seed>)
            (or, for a ``stage: sft`` variant, sft continued from it: the same-compute control)
        eval the SFT checkpoint and every variant               (run <run>-eval<digest>-s<seed>)
    results.json, results.md (mean and 95% interval over seeds), results.png

Every variant starts from the same SFT checkpoint and makes the same number of updates on
the same batch size ("same compute per method"); offline variants share the precomputed
rollouts. Each run is an ordinary stage run with a derived recipe (written under
``runs/<run>/repro/recipes``), so a killed study resumes where it stopped.
:func:`check` compares a results file with an expected-results file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from lopd import LopdError
from lopd.lineage import stage_prefix
from lopd.recipe import Recipe, load_recipe
from lopd.store import open_store

SFT_ROW = "sft"
# two-sided 95% Student-t quantiles by degrees of freedom (normal beyond the table)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class ReproError(LopdError):
    pass


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
        from lopd.pipeline import local_run_dir

        self.dir = local_run_dir(recipe) / "repro"
        self.base = recipe.model_dump(mode="json", exclude={"repro"})
        for name in self.cfg.variants:
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

    def teacher_b(self) -> tuple[Recipe, Path]:
        b = _merge(self.base, {"run_id": self.run_id("b"), "bootstrap": {"teacher_style": self.cfg.teacher_b_style}})
        b["models"]["teacher"] = {"uri": f"runs/{self.run_id('b')}-teacher/sft"}
        return self.write(self.run_id("b"), b)

    def inconsistent_precompute(self, teacher_b: Recipe) -> tuple[Recipe, Path]:
        data = self.only(self.base, "precompute")
        data["models"] = {**data["models"], "teacher": teacher_b.models.teacher.model_dump(mode="json")}
        data["precompute"] = {**data["precompute"], "student": self.uri(self.recipe.run_id, "sft")}
        data["allow_inconsistent_teacher"] = True
        return self.write(self.run_id("incons"), data)

    def stage(self, name: str) -> str:
        """The stage a row's run trains with (``opd``, or ``sft`` for the control)."""
        return "sft" if name == SFT_ROW else self.cfg.variants[name].stage

    def sft_control(self, seed: int) -> dict:
        """SFT continued from the SFT checkpoint on the study's SFT data, with the OPD rows' updates,
        batch size and optimizer: what the same compute buys without OPD."""
        data = self.only(self.base)
        data["models"] = {**data["models"], "student": {"uri": self.uri(self.recipe.run_id, "sft")}}
        data["sft"] = {**data["sft"], "data": stage_prefix(self.recipe.run_id, "sft-data"),
                       "optim": data["opd"]["optim"], "train": _merge(data["opd"]["train"], {"seed": seed})}
        return data

    def variant(self, name: str, seed: int) -> tuple[Recipe, Path]:
        v = self.cfg.variants[name]
        if v.stage == "sft":
            return self.write(self.run_id(name, seed), self.sft_control(seed))
        incons = v.teacher == "inconsistent"
        data = self.only(self.base)
        rollouts = stage_prefix(self.run_id("incons") if incons else self.recipe.run_id, "precompute")
        opd = _merge(data["opd"], v.opd)
        opd = _merge(opd, {"student": self.uri(self.recipe.run_id, "sft"), "rollouts": rollouts,
                           "train": {"seed": seed}, "online": {"sampling": {"seed": seed}}})
        opd["online"]["prompts"] = opd["online"].get("prompts") or self.base["precompute"]["prompts"]
        data["opd"] = opd
        if incons:
            data["allow_inconsistent_teacher"] = True
        return self.write(self.run_id(name, seed), data)

    def checkpoints(self, seed: int) -> list[str]:
        ckpts = [f"{SFT_ROW}={self.uri(self.recipe.run_id, 'sft')}"]
        return ckpts + [f"{n}={self.uri(self.run_id(n, seed), self.stage(n))}" for n in self.cfg.variants]

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

    from lopd.pipeline import run_bootstrap, run_stages

    console = console or Console(stderr=True)
    recipe = load_recipe(recipe_path, overrides)
    if seeds:
        recipe = recipe.model_copy(update={"repro": recipe.repro.model_copy(update={"seeds": seeds})}) \
            if recipe.repro else recipe
    study = Study(recipe, console)
    t0 = time.monotonic()
    run_bootstrap(recipe, nproc, console)
    run_stages(recipe, recipe_path, ["sft-data", "sft", "precompute"], overrides, nproc, console)
    if any(v.teacher == "inconsistent" for v in study.cfg.variants.values()):
        b, _ = study.teacher_b()
        run_bootstrap(b, nproc, console)
        r, f = study.inconsistent_precompute(b)
        run_stages(r, f, ["precompute"], (), nproc, console)
    for seed in study.cfg.seeds:
        for name in study.cfg.variants:
            r, f = study.variant(name, seed)
            run_stages(r, f, [study.stage(name)], (), nproc, console)
        r, f = study.evaluation(seed)
        run_stages(r, f, ["eval"], (), nproc, console)
    results = collect(study)
    write_results(study.dir, results)
    console.print(f"repro done in {time.monotonic() - t0:.0f}s")
    print((study.dir / "results.md").read_text())
    console.print(f"results: {study.dir / 'results.json'}, chart: {study.dir / 'results.png'}")
    return results


# ---------------------------------------------------------------------- results


def mean_ci(xs: list[float]) -> dict[str, float]:
    """Mean and 95% interval half-width over seeds (Student t; 0 for one seed)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "ci95": 0.0}
    t = T95.get(len(xs) - 1, 1.96)
    return {"mean": m, "ci95": t * statistics.stdev(xs) / math.sqrt(len(xs))}


def _train_seconds(store, run_id: str, stage: str) -> float:
    """Seconds one run spent in its training loop: per step, the update plus (online OPD) the
    weight sync, the sampling and the teacher's scoring."""
    text = store.read_bytes(f"{stage_prefix(run_id, stage)}/metrics.jsonl").decode()
    keys = ("step_time_s", "sync_s", "sample_s", "score_s")
    return sum(sum(json.loads(x).get(k, 0.0) for k in keys) for x in text.splitlines() if x.strip())


def collect(study: Study) -> dict[str, Any]:
    """Accuracy per row and seed from the eval summaries, training time per OPD run."""
    rows: dict[str, dict[str, Any]] = {SFT_ROW: {"acc": {}, "train_s": {}}}
    rows.update({n: {"acc": {}, "train_s": {}} for n in study.cfg.variants})
    bench = None
    for seed in study.cfg.seeds:
        s = study.store.read_json(f"{stage_prefix(study.eval_run_id(seed), 'eval')}/report/summary.json")
        bench = bench or s["benchmarks"][0]
        for name in rows:
            rows[name]["acc"][str(seed)] = s["results"][name]["benchmarks"][bench]["avg"]
            if name != SFT_ROW:
                rows[name]["train_s"][str(seed)] = _train_seconds(study.store, study.run_id(name, seed),
                                                                  study.stage(name))
    for name, r in rows.items():
        r["accuracy"] = mean_ci(list(r["acc"].values()))
        r["train_seconds"] = mean_ci(list(r["train_s"].values())) if r["train_s"] else None
        r["stage"] = study.stage(name)
        r["opd"] = study.cfg.variants[name].opd if name in study.cfg.variants else None
        r["teacher"] = study.cfg.variants[name].teacher if name in study.cfg.variants else None
    opd = study.recipe.opd
    return {"run_id": study.recipe.run_id, "benchmark": bench, "seeds": study.cfg.seeds,
            "opd_steps": opd.train.steps, "global_batch": opd.train.global_batch, "lr": opd.optim.lr,
            "eval_k": study.recipe.eval.k, "rows": rows}


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

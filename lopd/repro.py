"""``lopd repro``: the paper's comparison at toy scale, from one recipe with a ``repro`` section.

    bootstrap teacher A; sft-data → sft → precompute            (the recipe's own run, once)
    for each other teacher a variant names (repro.teachers): bootstrap it (run <run>-t-<name>)
    if a variant needs it: teacher A answers the OPD prompts     (run <run>-kd, sft-data)
    for seed in seeds:
        the seed's student (``repro.independent_seeds``; seed 0 is the recipe's own run):
            initialised, SFT on the study's SFT data, its rollouts (run <run>-s<seed>: sft, precompute)
            and, for offline variants another teacher scores, its rollouts scored by that teacher
                                                                  (run <run>-p-<name>[-s<seed>])
        on the first seed, with ``repro.selection``: every row's candidate settings trained and
            evaluated on the validation split, the best chosen    (:mod:`lopd.repro_select`)
        for variant in the selected variants (``repro.rows``), with its chosen settings
                                                                  (run <run>-<variant>[-<digest>]-s<seed>)
            opd from the seed's SFT checkpoint on its rollouts, or, for a variant that owns its
            rollouts (``precompute`` changes or ``opd.rounds`` > 1), its own precompute and opd
            instances (precompute, opd, precompute-r2, opd-r2, ...) from that checkpoint,
            or, for a ``stage: sft`` variant, sft continued from it on the SFT data (the
            same-compute control) or on <run>-kd (sequence-level distillation)
        eval the seed's SFT checkpoint and every variant on the test split
                                                                  (run <run>-eval<digest>-s<seed>)
    results.json, results.md (mean and 95% interval over seeds, paired Δ vs SFT, cost per row),
    results.png, diagnostics.png (KL to SFT and the reverse-KL estimate per step, per row)

Every variant of a seed starts from that seed's SFT checkpoint; the offline variants share its
precomputed rollouts. Each run is an ordinary stage run with a derived recipe (written under
``runs/<run>/repro/recipes``), so a killed study resumes where it stopped. This module derives
the recipes and run ids (:class:`Study`); :mod:`lopd.repro_run` runs them and collects the results.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import yaml

from lopd import repro_cosine
from lopd.layout import local_run_dir, repro_dir, stage_prefix, teacher_sft_prefix
from lopd.recipe import Recipe
from lopd.repro_results import SFT_ROW, ReproError
from lopd.repro_select import checkpoint_every, digest, merge, nested
from lopd.stages import instance, stages_of
from lopd.store import open_store

MAX_RUN_ID = 40
"""Longest run id a study derives (it names directories and Kubernetes objects)."""


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
        self.chosen: dict[str, dict[str, Any]] = {}
        """Each row's settings chosen on the validation split (dotted key -> value; set by
        :func:`lopd.repro_run.run` or :func:`lopd.repro_run.collect`); empty without a selection."""
        if self.cfg.independent_seeds and recipe.bootstrap is None and any(self.cfg.seeds):
            raise ReproError("repro.independent_seeds: a seed other than 0 initialises its own student, which needs "
                             "the recipe's bootstrap section (or set repro.independent_seeds=false)")
        longest = "-0000" if self.cfg.selection else ""
        for name in self.variants:
            self.run_id(name + longest, max(self.cfg.seeds))  # fails early when too long
        repro_cosine.check(self)

    def run_id(self, name: str | None, seed: int | None = None) -> str:
        """``<run>[-<name>][-s<seed>]``."""
        rid = self.recipe.run_id + (f"-{name}" if name else "") + ("" if seed is None else f"-s{seed}")
        if len(rid) > MAX_RUN_ID:
            raise ReproError(f"repro: run id {rid!r} is longer than {MAX_RUN_ID} characters (shorten run_id or the "
                             "variant)")
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

    # ------------------------------------------------------------------ seeds

    def offset(self, seed: int) -> int:
        """What seed ``seed`` adds to the student's init, SFT and rollout seeds (0 when seeds share them)."""
        return seed if self.cfg.independent_seeds else 0

    def base_run(self, seed: int) -> str:
        """The run of a seed's SFT student and rollouts: the recipe's own, or ``<run>-s<seed>``."""
        return self.run_id(None, seed) if self.offset(seed) else self.recipe.run_id

    def sft_uri(self, seed: int) -> str:
        """The SFT checkpoint every row of seed ``seed`` starts from."""
        return self.uri(self.base_run(seed), "sft")

    def sampling_seed(self, seed: int, precompute: dict) -> int:
        return int(precompute["sampling"]["seed"]) + self.offset(seed)

    def student_init(self, seed: int) -> Path:
        """Where seed ``seed``'s student base is initialised (in its run's directory)."""
        return local_run_dir(self.recipe.store, self.base_run(seed)) / "init" / "student"

    def seed_base(self, seed: int) -> tuple[Recipe, Path]:
        """A seed's own student (its sft and precompute stages): initialised with the student seed
        plus ``seed``, trained on the study's SFT data in the order of ``sft.train.seed`` plus
        ``seed``, its rollouts sampled with ``precompute.sampling.seed`` plus ``seed``."""
        k, data = self.offset(seed), self.only(self.base, "precompute")
        data["models"] = merge(data["models"], {"student": {"uri": str(self.student_init(seed))}})
        data["sft"] = merge(data["sft"], {"data": stage_prefix(self.recipe.run_id, "sft-data"),
                                          "train": {"seed": int(data["sft"]["train"]["seed"]) + k}})
        pre = data["precompute"]
        data["precompute"] = merge(pre, {"sampling": {"seed": self.sampling_seed(seed, pre)}})
        return self.write(self.base_run(seed), data)

    # ------------------------------------------------------------------ teachers

    def teacher(self, name: str) -> tuple[Recipe, Path]:
        """The bootstrap recipe of another teacher (``repro.teachers``): teacher A's with its changes."""
        t, rid = self.cfg.teachers[name], self.run_id(f"t-{name}")
        change = {"teacher_style": t.style, "teacher_draw": t.draw}
        if t.seed is not None:
            change["teacher_sft"] = {"train": {"seed": t.seed}}
        b = merge(self.base, {"run_id": rid, "bootstrap": change})
        b["models"]["teacher"] = {"uri": teacher_sft_prefix(rid)}
        return self.write(rid, b)

    def teacher_run(self, name: str, seed: int) -> str:
        """The run of a seed's rollouts scored by another teacher."""
        return self.run_id(f"p-{name}", seed if self.offset(seed) else None)

    def teacher_precompute(self, name: str, seed: int) -> tuple[Recipe, Path]:
        """A seed's rollouts (its precompute from its SFT checkpoint) scored by another teacher."""
        data = self.only(self.base, "precompute")
        data["models"] = {**data["models"], "teacher": self.teacher(name)[0].models.teacher.model_dump(mode="json")}
        data["precompute"] = merge(data["precompute"], {"student": self.sft_uri(seed), "sampling": {
            "seed": self.sampling_seed(seed, data["precompute"])}})
        data["allow_inconsistent_teacher"] = True
        return self.write(self.teacher_run(name, seed), data)

    def kd_data(self) -> tuple[Recipe, Path]:
        """Teacher A's answers to the OPD prompts (the sft-data stage, sampled like the SFT data): the
        data of sequence-level distillation on OPD's prompt budget."""
        data = self.only(self.base, "sft_data")
        data["sft_data"] = {**data["sft_data"], "prompts": self.base["precompute"]["prompts"]}
        return self.write(self.run_id("kd"), data)

    # ------------------------------------------------------------------ rows

    def settings(self, name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """A row's settings (dotted key -> value): ``settings``, or else those chosen for it."""
        if settings is not None or name == SFT_ROW:
            return settings or {}
        if self.cfg.selection is not None and name not in self.chosen:
            raise ReproError(f"repro: no settings chosen for {name!r} yet (the selection has not run)")
        return self.chosen.get(name, {})

    def opd(self, name: str, settings: dict[str, Any] | None = None) -> dict:
        """The recipe's ``opd`` section with the variant's changes and its settings merged in."""
        return merge(merge(self.base["opd"], self.cfg.variants[name].opd), nested(self.settings(name, settings)))

    def rounds(self, name: str, settings: dict[str, Any] | None = None) -> int:
        """Lightning rounds of a variant's OPD (1 for the SFT row, the control and online OPD)."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft":
            return 1
        opd = self.opd(name, settings)
        return int(opd.get("rounds", 1)) if opd.get("mode", "offline") == "offline" else 1

    def owns_rollouts(self, name: str, settings: dict[str, Any] | None = None) -> bool:
        """Whether a variant samples and scores its own rollouts (``precompute`` changes or
        Lightning rounds) instead of sharing its seed's precompute."""
        if name == SFT_ROW:
            return False
        v = self.cfg.variants[name]
        return v.stage == "opd" and (bool(v.precompute) or self.rounds(name, settings) > 1)

    def shares_rollouts(self, name: str, settings: dict[str, Any] | None = None) -> bool:
        """Whether a variant trains offline on a shared precompute (:meth:`rollouts_run`'s)."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft" or self.owns_rollouts(name, settings):
            return False
        return self.opd(name, settings).get("mode", "offline") == "offline"

    def rollouts_run(self, name: str, seed: int) -> str:
        """The run whose precompute a variant on the shared rollouts trains on: the seed's own, or
        for a variant another teacher scores, that teacher's (``<run>-p-<teacher>[-s<seed>]``)."""
        teacher = self.cfg.variants[name].teacher
        return self.teacher_run(teacher, seed) if teacher else self.base_run(seed)

    def stage(self, name: str, settings: dict[str, Any] | None = None) -> str:
        """The stage instance that made a row's final checkpoint: ``opd`` (the last round's,
        ``opd-r<R>``, for Lightning rounds), or ``sft`` for the control."""
        if name == SFT_ROW or self.cfg.variants[name].stage == "sft":
            return "sft"
        return instance("opd", self.rounds(name, settings))

    def stages(self, name: str, recipe: Recipe, settings: dict[str, Any] | None = None) -> list[str]:
        """The stage instances a variant's run runs (its derived ``recipe``): the training stage,
        or, for a variant that owns its rollouts, every precompute and opd round in order."""
        if self.owns_rollouts(name, settings):
            return [s for s in stages_of(recipe) if s not in ("sft-data", "sft", "eval")]
        return [self.stage(name, settings)]

    def row_run(self, name: str, seed: int, settings: dict[str, Any] | None = None) -> str:
        """A row's run for a seed: ``<run>-<row>-s<seed>``, with ``-<digest>`` of its settings
        when they are chosen on the validation split (each candidate is its own run)."""
        if name == SFT_ROW:
            return self.base_run(seed)
        if self.cfg.selection is None:
            return self.run_id(name, seed)
        return self.run_id(f"{name}-{digest(self.settings(name, settings))}", seed)

    def _train(self, name: str, seed: int, train: dict) -> dict:
        change: dict[str, Any] = {"seed": seed}
        if every := checkpoint_every(self, name):
            change["checkpoint_every"] = every
        return merge(train, change)

    def sft_control(self, name: str, seed: int, settings: dict[str, Any] | None = None) -> dict:
        """SFT continued from the seed's SFT checkpoint with the OPD rows' updates, batch size and
        optimizer, on the study's SFT data (what the same compute buys without OPD) or on teacher A's
        answers to the OPD prompts (sequence-level distillation)."""
        data, opd = self.only(self.base), self.opd(name, settings)
        data["models"] = {**data["models"], "student": {"uri": self.sft_uri(seed)}}
        source = self.run_id("kd") if self.cfg.variants[name].sft_data == "opd" else self.recipe.run_id
        data["sft"] = {**data["sft"], "data": stage_prefix(source, "sft-data"), "optim": opd["optim"],
                       "train": self._train(name, seed, opd["train"])}
        return data

    def variant(self, name: str, seed: int, settings: dict[str, Any] | None = None) -> tuple[Recipe, Path]:
        """A row's run for a seed with ``settings`` (default: the chosen ones)."""
        return self.write(self.row_run(name, seed, settings), self.variant_data(name, seed, settings))

    def variant_data(self, name: str, seed: int, settings: dict[str, Any] | None = None) -> dict:
        """The derived recipe (before validation) of :meth:`variant`."""
        v = self.cfg.variants[name]
        if v.stage == "sft":
            return self.sft_control(name, seed, settings)
        own, sft = self.owns_rollouts(name, settings), self.sft_uri(seed)
        data = self.only(self.base, *(("precompute",) if own else ()))
        opd = self.opd(name, settings)
        opd = merge(opd, {"student": sft, "train": self._train(name, seed, opd["train"]),
                          "online": {"sampling": {"seed": seed}}})
        if own:  # its own precompute rounds, sampled from the seed's SFT checkpoint
            pre = merge(data["precompute"], v.precompute)
            data["precompute"] = merge(pre, {"student": sft, "sampling": {"seed": self.sampling_seed(seed, pre)}})
            opd.pop("rollouts", None)
        else:
            opd["rollouts"] = stage_prefix(self.rollouts_run(name, seed), "precompute")
        opd["online"]["prompts"] = opd["online"].get("prompts") or self.base["precompute"]["prompts"]
        data["opd"] = opd
        if v.teacher:  # another teacher scores (offline: its precompute; online: live)
            data["models"] = {**data["models"],
                              "teacher": self.teacher(v.teacher)[0].models.teacher.model_dump(mode="json")}
            data["allow_inconsistent_teacher"] = True
        return data

    def checkpoints(self, seed: int) -> list[str]:
        ckpts = [f"{SFT_ROW}={self.sft_uri(seed)}"]
        return ckpts + [f"{n}={self.uri(self.row_run(n, seed), self.stage(n))}" for n in self.variants]

    def eval_run_id(self, seed: int) -> str:
        """``<run>-eval<digest>-s<seed>``: the digest of the checkpoint list, so that adding a variant
        to a finished study evaluates again instead of reusing a table that lacks it."""
        digest6 = hashlib.sha256("\n".join(self.checkpoints(seed)).encode()).hexdigest()[:6]
        return self.run_id(f"eval{digest6}", seed)

    def evaluation(self, seed: int) -> tuple[Recipe, Path]:
        data = self.only(self.base)
        data["eval"] = merge(data["eval"], {"checkpoints": self.checkpoints(seed), "sampling": {"seed": seed}})
        return self.write(self.eval_run_id(seed), data)

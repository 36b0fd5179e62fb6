"""lopd repro's protocol: independent seeds (each seed its own student, SFT order and rollouts) and
settings chosen on the validation split (:mod:`lopd.repro_select`); derived recipes and run order
only, nothing trained (the CI-size study in tests/test_embedded.py runs them)."""

from __future__ import annotations

import json

import pytest

from lopd.recipe import RecipeError
from lopd.repro_results import SFT_ROW, ReproError
from tests.helpers.repro import TINY, QuietConsole, study

GRID = ("repro.rows={sft-continued,lightning-is,lightning-paper,rounds2}",)


def test_seed_zero_is_the_recipes_own_run_and_another_seed_its_own_student(tmp_path):
    s = study(tmp_path, "repro.selection=null", shared=False)
    assert s.base_run(0) == "tiny" and s.sft_uri(0) == s.uri("tiny", "sft")
    r, _ = s.seed_base(2)
    base = s.recipe
    assert r.run_id == "tiny-s2" and r.models.student.uri == str(tmp_path / "runs" / "tiny-s2" / "init" / "student")
    assert r.sft.data == "runs/tiny/sft-data" and r.sft_data is None  # the same SFT data, in another order
    assert r.sft.train.seed == base.sft.train.seed + 2 and r.sft.train.steps == base.sft.train.steps
    assert r.precompute.sampling.seed == base.precompute.sampling.seed + 2 and r.precompute.student is None
    assert r.models.teacher.uri == base.models.teacher.uri and r.bootstrap is None
    lightning, _ = s.variant("lightning-is", 2)
    assert lightning.opd.student == s.uri("tiny-s2", "sft") and lightning.opd.rollouts == "runs/tiny-s2/precompute"
    assert lightning.run_id == "tiny-lightning-is-s2" and lightning.opd.train.seed == 2
    p, _ = s.teacher_precompute("redraw", 2)
    assert p.run_id == "tiny-p-redraw-s2" and p.precompute.student == s.uri("tiny-s2", "sft")
    assert p.precompute.sampling.seed == r.precompute.sampling.seed  # the seed's rollouts, scored by "redraw"
    assert s.variant("inconsistent-redraw", 2)[0].opd.rollouts == "runs/tiny-p-redraw-s2/precompute"
    assert s.teacher_precompute("redraw", 0)[0].run_id == "tiny-p-redraw"
    topk, _ = s.variant("topk", 2)  # a row with its own rollouts samples them with the seed's sampling seed
    assert topk.precompute.student == s.uri("tiny-s2", "sft")
    assert topk.precompute.sampling.seed == r.precompute.sampling.seed
    assert s.variant("sft-continued", 2)[0].models.student.uri == s.uri("tiny-s2", "sft")
    assert s.evaluation(2)[0].eval.checkpoints[0] == f"{SFT_ROW}={s.uri('tiny-s2', 'sft')}"


def test_shared_seeds_keep_one_student(tmp_path):
    s = study(tmp_path, "repro.selection=null", "repro.independent_seeds=false", shared=False)
    assert s.base_run(3) == "tiny" and s.sft_uri(3) == s.uri("tiny", "sft")
    assert s.variant("topk", 3)[0].precompute.sampling.seed == s.recipe.precompute.sampling.seed
    with pytest.raises(ReproError, match="needs the recipe's bootstrap section"):
        study(tmp_path, "repro.selection=null", "bootstrap=null", "models.teacher.uri=runs/tiny-teacher/sft",
              "models.student.uri=runs/tiny/init/student", shared=False)


def test_every_row_gets_the_same_grid_and_one_run_per_learning_rate(tmp_path):
    from lopd.repro_select import candidates, checkpoint_every, runs

    s = study(tmp_path, *GRID, shared=False)
    grid = s.cfg.selection.grid
    assert len(candidates(s, "lightning-is")) == len(grid["optim.lr"]) * len(grid["train.steps"])
    assert candidates(s, "lightning-is")[0] == {"optim.lr": grid["optim.lr"][0], "train.steps": grid["train.steps"][0]}
    assert candidates(s, "sft-continued") == candidates(s, "lightning-is")  # the control is tuned alike
    # constant learning rate, one round: the steps candidates are one run's checkpoints
    r = runs(s, "lightning-is")
    assert [settings for settings, _ in r] == [{"optim.lr": lr, "train.steps": max(grid["train.steps"])}
                                               for lr in grid["optim.lr"]]
    assert [steps for _, steps in r[0][1]] == grid["train.steps"] and [i for _, m in r for i, _ in m] == list(range(9))
    assert checkpoint_every(s, "lightning-is") == 10
    # the paper-regime row keeps its two passes (its own grid key); rounds cannot share checkpoints
    assert {c["train.steps"] for c in candidates(s, "lightning-paper")} == {32}
    assert len(runs(s, "rounds2")) == len(candidates(s, "rounds2"))
    cos = study(tmp_path, *GRID, "opd.optim.schedule=cosine", shared=False)
    assert len(runs(cos, "lightning-is")) == 9  # a schedule that depends on the total: one run per candidate
    kl = study(tmp_path, *GRID, "repro.selection.grid.kl_coef={0.0,1.0}", shared=False)
    assert len(candidates(kl, "lightning-is")) == 18 and len(candidates(kl, "sft-continued")) == 9  # no kl for SFT


def test_candidate_runs_are_named_by_their_settings_and_the_test_run_reuses_the_selection_run(tmp_path):
    from lopd.repro_select import candidates, runs

    s = study(tmp_path, *GRID, shared=False)
    settings, members = runs(s, "lightning-is")[1]
    r, f = s.variant("lightning-is", 0, settings)
    assert r.opd.optim.lr == settings["optim.lr"] and r.opd.train.steps == 80 and r.opd.train.checkpoint_every == 10
    assert r.run_id.startswith("tiny-lightning-is-") and r.run_id.endswith("-s0") and len(r.run_id) == 25
    with pytest.raises(ReproError, match="no settings chosen for 'lightning-is'"):
        s.variant("lightning-is", 1)
    s.chosen = {n: candidates(s, n)[0] for n in s.variants}
    s.chosen["lightning-is"] = candidates(s, "lightning-is")[members[-1][0]]  # the candidate of 80 updates
    again, f2 = s.variant("lightning-is", 0)
    assert again.run_id == r.run_id and f2.read_text() == f.read_text()  # the very same run: not trained twice
    s.chosen["lightning-is"] = candidates(s, "lightning-is")[members[0][0]]  # 20 updates: a run of its own
    short, _ = s.variant("lightning-is", 3)
    assert short.opd.train.steps == 20 and short.run_id != r.run_id.replace("-s0", "-s3")


def test_validation_eval_scores_every_candidate_on_the_validation_split(tmp_path):
    from lopd.repro_select import validation

    s = study(tmp_path, *GRID, shared=False)
    r, _ = validation(s, 0)
    assert r.eval.datasets["arith"].path == "runs/tiny/data/arith_val.jsonl" and r.eval.k == 2
    assert r.eval.inference.backend == "hf" and r.run_id.startswith("tiny-val") and r.eval.sampling.seed == 0
    labels = [c.split("=", 1)[0] for c in r.eval.checkpoints]
    assert labels[:9] == [f"sft-continued-{i}" for i in range(9)] and len(labels) == 9 + 9 + 3 + 9
    assert r.eval.checkpoints[0].endswith("/sft/checkpoints/step-000020") and r.eval.checkpoints[2].endswith("/sft")
    assert r.eval.checkpoints[-1].endswith("/opd-r2")  # rounds: each candidate its own run's last round
    with pytest.raises(ReproError, match=r"need inference.backend hf") as e:
        validation(study(tmp_path, *GRID, "repro.selection.eval.inference.backend=vllm", shared=False), 0)
    assert "\n" not in str(e.value)


def test_choose_takes_the_best_validation_accuracy_ties_to_the_earlier_candidate(tmp_path):
    from lopd.layout import report_prefix, stage_prefix
    from lopd.manifest import publish
    from lopd.repro_select import candidates, choose, label, validation

    s = study(tmp_path / "store", "repro.rows={lightning,sft-continued}", shared=False)
    accs = {"lightning": [0.5, 0.7, 0.6, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5], "sft-continued": [0.9] * 9}
    summary = {"benchmarks": ["arith"], "results": {
        label(n, i): {"benchmarks": {"arith": {"avg": a}}} for n, v in accs.items() for i, a in enumerate(v)}}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.json").write_text(json.dumps(summary))
    rid = validation(s, 0)[0].run_id
    publish(s.store, report_prefix(stage_prefix(rid, "eval")), tmp_path / "report", stage="eval-report", run_id=rid)
    got = choose(s, 0)
    assert got["lightning"]["chosen"] == candidates(s, "lightning")[1]  # 0.7 twice: the earlier
    assert got["sft-continued"]["chosen"] == candidates(s, "sft-continued")[0]
    assert [c["validation"] for c in got["lightning"]["candidates"]] == accs["lightning"]


def test_grid_keys_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="at most 8 items|at most 8") as e:
        study(tmp_path, "repro.selection.grid.optim.lr={1,2,3,4,5,6,7,8,9}", shared=False)
    assert "\n" not in str(e.value)
    s = study(tmp_path, "repro.rows={lightning}", "repro.selection.grid.optim.nonsense={1}", shared=False)
    from lopd.repro_select import runs

    settings, _ = runs(s, "lightning")[0]
    with pytest.raises(RecipeError, match="nonsense"):  # an unknown key fails like any recipe key
        s.variant("lightning", 0, settings)
    with pytest.raises(RecipeError, match="distinct"):
        study(tmp_path, "repro.seeds={1,1}", shared=False)


def test_run_selects_on_the_first_seed_then_trains_every_seed_with_the_chosen_settings(tmp_path, monkeypatch):
    import lopd.bootstrap
    import lopd.repro_run
    import lopd.runner
    from lopd.repro_select import candidates

    calls = []
    monkeypatch.setattr(lopd.bootstrap, "init_student", lambda r, dest, k: calls.append(("init", k)))
    monkeypatch.setattr(lopd.runner, "run_bootstrap", lambda r, *a: calls.append((r.run_id, "bootstrap")))
    monkeypatch.setattr(lopd.runner, "run_stages", lambda r, f, stages, *a: calls.append((r.run_id, *stages)))
    monkeypatch.setattr(lopd.repro_run, "choose", lambda s, seed: {
        n: {"chosen": candidates(s, n)[-1], "candidates": []} for n in s.variants})
    monkeypatch.setattr(lopd.repro_run, "collect", lambda s: {})
    monkeypatch.setattr(lopd.repro_run, "write_results", lambda d, res: (d / "results.md").write_text("table\n"))
    lopd.repro_run.run(str(TINY), (f"store={tmp_path}", "repro.rows={lightning,online-redraw}"), seeds=[0, 1],
                       console=QuietConsole())
    ids = [c[0] for c in calls]
    assert calls[:3] == [("tiny", "bootstrap"), ("tiny", "sft-data", "sft", "precompute"),
                         ("tiny-t-redraw", "bootstrap")]
    sel = [c for c in calls[3:] if c[0].endswith("-s0") and c[0] != ids[-1]]
    assert len(sel) == 3 + 3 + 1 + 2 + 1 + 1 and sel[6][0].startswith("tiny-val") and sel[6][1:] == ("eval",)
    assert sel[7][0] == sel[2][0]  # the chosen (last) lightning candidate is its selection run: run again, skipped
    assert sel[9][0].startswith("tiny-lightning-cos-") and sel[9][1:] == ("opd",)  # the gradient cosine, seed 0
    i = calls.index(("init", 1))
    assert calls[i + 1] == ("tiny-s1", "sft", "precompute")  # seed 1's own student, then its rows
    assert [c[0].rsplit("-", 2)[0] for c in calls[i + 2:i + 4]] == ["tiny-lightning", "tiny-online-redraw"]
    assert ids[-1].startswith("tiny-eval") and ids[-1].endswith("-s1")


def test_results_md_lists_the_chosen_settings(tmp_path):
    from lopd.repro_results import mean_ci, write_results

    rows = {n: {"acc": {"0": 0.5}, "accuracy": mean_ci([0.5]), "cost": None} for n in (SFT_ROW, "lightning")}
    sel = {"seed": 0, "validation": "runs/tiny/data/arith_val.jsonl", "rule": "highest validation accuracy",
           "rows": {"lightning": {"chosen": {"optim.lr": 1e-4, "train.steps": 40},
                                  "candidates": [{"validation": 0.9}, {"validation": 0.95}, {"validation": 0.95}]}}}
    write_results(tmp_path, {"run_id": "t", "benchmark": "arith", "seeds": [0], "opd_steps": 80, "global_batch": 256,
                             "lr": 1e-4, "eval_k": 4, "rows": rows, "selection": sel})
    md = (tmp_path / "results.md").read_text()
    assert "| lightning | lr 0.0001, 40 updates | 95.0 | 3 | 90.0–95.0 |" in md and "arith_val.jsonl" in md

"""lopd repro: derived recipes, statistics, the table and the check (no training here; the
end-to-end study at CI size runs in tests/test_embedded.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lopd.recipe import RecipeError, load_recipe
from lopd.repro_results import SFT_ROW, ReproError, check, mean_ci, paired, write_results
from tests.helpers.cli import lopd_cli
from tests.helpers.repro import SHARED, QuietConsole, study

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "recipes" / "tiny.yaml"


def test_variant_recipes_share_the_sft_student_and_rollouts(tmp_path):
    s = study(tmp_path)
    r, f = s.variant("lightning-is", 2)
    assert f.is_file() and r.run_id == "tiny-lightning-is-s2"
    assert r.opd.importance_weights.enabled and r.opd.train.seed == 2 and r.opd.online.sampling.seed == 2
    assert r.opd.rollouts == "runs/tiny/precompute" and r.opd.student.endswith("runs/tiny/sft")
    assert r.opd.train.steps == load_recipe(TINY).opd.train.steps  # same compute per method
    assert r.bootstrap is None and r.precompute is None and not r.allow_inconsistent_teacher
    online, _ = s.variant("online", 0)
    assert online.opd.mode == "online" and online.opd.online.prompts == "runs/tiny/data/opd_prompts.jsonl"
    incons, _ = s.variant("inconsistent", 1)
    assert incons.allow_inconsistent_teacher and incons.opd.rollouts == "runs/tiny-p-words/precompute"
    assert incons.models.teacher.uri == "runs/tiny-t-words-teacher/sft"
    redraw, _ = s.variant("online-redraw", 1)  # online OPD scored live by teacher "redraw"
    assert redraw.opd.mode == "online" and redraw.allow_inconsistent_teacher
    assert redraw.models.teacher.uri == "runs/tiny-t-redraw-teacher/sft"


def test_sft_control_continues_sft_with_the_opd_rows_compute(tmp_path):
    s = study(tmp_path)
    r, f = s.variant("sft-continued", 1)
    base = load_recipe(TINY)
    assert s.stage("sft-continued") == "sft" and r.run_id == "tiny-sft-continued-s1" and f.is_file()
    assert r.models.student.uri.endswith("runs/tiny/sft") and r.sft.data == "runs/tiny/sft-data"
    assert (r.sft.train.steps, r.sft.train.global_batch) == (base.opd.train.steps, base.opd.train.global_batch)
    assert r.sft.optim == base.opd.optim and r.sft.train.seed == 1
    assert r.models.teacher.uri == "runs/tiny-teacher/sft" and r.bootstrap is None and r.sft_data is None
    assert s.evaluation(1)[0].eval.checkpoints[1] == f"sft-continued={s.uri('tiny-sft-continued-s1', 'sft')}"


def test_sft_control_takes_no_opd_changes(tmp_path):
    with pytest.raises(RecipeError, match="takes no 'opd' changes"):
        study(tmp_path, "repro.variants.sft-continued.opd.kl_coef=1.0")


def test_other_teachers_and_their_precompute(tmp_path):
    s = study(tmp_path)
    b, _ = s.teacher("words")
    assert b.run_id == "tiny-t-words" and b.bootstrap.teacher_style == "words" and b.bootstrap.teacher_draw == 0
    assert b.models.teacher.uri == "runs/tiny-t-words-teacher/sft"
    assert b.bootstrap.teacher_sft == s.recipe.bootstrap.teacher_sft  # trained like A
    c, _ = s.teacher("redraw")  # A's style and initial weights, other problems, another data order
    assert (c.bootstrap.teacher_style, c.bootstrap.teacher_draw, c.bootstrap.teacher_sft.train.seed) == ("chain", 1, 1)
    assert c.bootstrap.teacher == s.recipe.bootstrap.teacher and c.bootstrap.data_dir == s.recipe.bootstrap.data_dir
    assert s.recipe.bootstrap.teacher_sft.train.seed != 1
    p, _ = s.teacher_precompute("words", 0)
    assert p.run_id == "tiny-p-words" and p.allow_inconsistent_teacher
    assert p.models.teacher.uri == "runs/tiny-t-words-teacher/sft"
    assert p.precompute.student.endswith("runs/tiny/sft") and p.precompute.sampling == s.recipe.precompute.sampling
    for name, v in s.cfg.variants.items():  # deriving other teachers' recipes leaves everyone else with teacher A
        if v.teacher is None:
            assert s.variant(name, 0)[0].models.teacher.uri == "runs/tiny-teacher/sft", name
    assert s.evaluation(0)[0].models.teacher.uri == "runs/tiny-teacher/sft"


def test_sequence_level_distillation_trains_on_the_teachers_answers_to_the_opd_prompts(tmp_path):
    s = study(tmp_path)
    kd, _ = s.kd_data()
    assert kd.run_id == "tiny-kd" and kd.sft_data.prompts == s.recipe.precompute.prompts
    assert kd.sft_data.sampling == s.recipe.sft_data.sampling and kd.models.teacher.uri == "runs/tiny-teacher/sft"
    r, _ = s.variant("seqkd", 2)
    assert s.stage("seqkd") == "sft" and r.sft.data == "runs/tiny-kd/sft-data"
    assert r.models.student.uri.endswith("runs/tiny/sft") and r.sft.train.seed == 2
    assert (r.sft.train.steps, r.sft.optim) == (s.recipe.opd.train.steps, s.recipe.opd.optim)


def test_paper_regime_row_samples_its_own_tempered_rollouts(tmp_path):
    s = study(tmp_path)
    r, _ = s.variant("lightning-paper", 0)
    assert s.owns_rollouts("lightning-paper") and s.stages("lightning-paper", r) == ["precompute", "opd"]
    assert (r.precompute.sampling.temperature, r.precompute.sampling.top_p) == (0.7, 0.9)
    assert r.opd.train.steps * r.opd.train.global_batch == 2 * 4096  # two passes over the rollouts
    assert not r.opd.importance_weights.enabled


@pytest.mark.parametrize("change, msg", [
    ("repro.variants.lightning.teacher=nobody", "teacher 'nobody' is not in repro.teachers"),
    ("repro.teachers.x-s1.draw=1", "not ending in -s<digits>"),
    ("repro.variants.lightning.sft_data=opd", "'sft_data' is for 'stage: sft' variants"),
    ("repro.teachers.words.draw=2", "less than or equal to 1"),
])
def test_bad_teacher_and_sft_data_settings_are_one_line_errors(tmp_path, change, msg):
    with pytest.raises(RecipeError, match=msg) as e:
        study(tmp_path, change)
    assert "\n" not in str(e.value)


def test_eval_recipe_scores_sft_and_every_variant_of_a_seed(tmp_path):
    r, _ = study(tmp_path).evaluation(1)
    labels = [c.split("=", 1)[0] for c in r.eval.checkpoints]
    assert labels == [SFT_ROW, "sft-continued", "seqkd", "lightning", "lightning-paper", "lightning-is", "lightning-kl",
                      "online", "inconsistent", "inconsistent-redraw", "online-redraw", "rounds2", "rounds4", "topk",
                      "rounds2-topk"]
    assert r.eval.sampling.seed == 1 and r.eval.checkpoints[3].endswith("runs/tiny-lightning-s1/opd")
    assert r.eval.checkpoints[-1].endswith("runs/tiny-rounds2-topk-s1/opd-r2")  # the last round's student
    assert r.run_id.startswith("tiny-eval") and r.run_id.endswith("-s1")


def test_adding_a_variant_evaluates_again(tmp_path):
    """A finished study's eval lacks a variant added later: its run id changes, so it is not skipped."""
    before = study(tmp_path).evaluation(0)[0].run_id
    assert study(tmp_path).evaluation(0)[0].run_id == before  # stable: a killed study resumes
    after = study(tmp_path, "repro.variants.lightning-lr.opd.optim.lr=1e-5").evaluation(0)[0]
    assert after.run_id != before and after.eval.checkpoints[-1].startswith("lightning-lr=")


@pytest.mark.parametrize("name, err, msg", [
    ("SFT", RecipeError, "repro.variants: .*'SFT': use lowercase"),
    ("sft", RecipeError, "not sft"),
    ("a-very-long-variant-name-indeed-yes", ReproError, "longer than 40"),
])
def test_bad_variant_names_are_one_line_errors(tmp_path, name, err, msg):
    with pytest.raises(err, match=msg):
        study(tmp_path, f"repro.variants.{name}.stage=opd")


def test_no_repro_section(tmp_path):
    with pytest.raises(ReproError, match="no 'repro' section"):
        study(tmp_path, "repro=null")


def test_mean_ci_uses_student_t():
    assert mean_ci([0.5]) == {"mean": 0.5, "ci95": 0.0}
    r = mean_ci([0.4, 0.5, 0.6])
    assert r["mean"] == pytest.approx(0.5) and r["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_paired_differences_against_sft_are_seed_by_seed():
    """The paired t-test: per-seed differences, their Student-t interval, significant when it excludes 0."""
    sft = {"0": 0.75, "1": 0.76, "2": 0.80}
    d = paired({"0": 0.80, "1": 0.84, "2": 0.86}, sft)  # +5, +8, +6 points: every seed agrees
    assert d["mean"] == pytest.approx(0.19 / 3) and d["seeds"] == 3 and d["significant"]
    assert d["ci95"] == pytest.approx(4.303 * statistics.stdev([0.05, 0.08, 0.06]) / 3 ** 0.5)
    assert d["test"] == "paired t-test over seeds, two-sided, 5%"
    # the same means unpaired would overlap; paired, a seed that disagrees makes it not significant
    assert not paired({"0": 0.85, "1": 0.74, "2": 0.80}, sft)["significant"]
    assert not paired({"0": 0.9}, {"0": 0.7, "1": 0.7})["significant"]  # one common seed: no test


def _cost(total: float | None) -> dict:
    values = {"sampled_tokens": 393216.0, "scored_tokens": 393216.0, "trained_tokens": 1234567.0, "sample_s": 40.25,
              "score_s": 15.0, "train_s": 123.4, "total_s": total}
    return {q: {"seeds": {"0": v, "1": v}, "mean": v} for q, v in values.items()}


def _results(accs: dict[str, list[float]], totals: dict[str, float | None] | None = None) -> dict:
    totals = totals or {}
    rows = {n: {"acc": {str(i): a for i, a in enumerate(v)}, "accuracy": mean_ci(v),
                "train_seconds": None if n == SFT_ROW else mean_ci([1.0, 2.0]),
                "cost": None if n == SFT_ROW else _cost(totals.get(n, 200.0))} for n, v in accs.items()}
    return {"run_id": "t", "benchmark": "arith", "seeds": [0, 1], "opd_steps": 5, "global_batch": 8,
            "lr": 1e-5, "eval_k": 2, "rows": rows}


def test_table_png_and_check(tmp_path):
    res = _results({SFT_ROW: [0.40, 0.42], "lightning": [0.50, 0.52]})
    write_results(tmp_path, res)
    md = (tmp_path / "results.md").read_text()
    assert "| lightning | 51.0 ± 12.7 | +10.0 ± 0.0* | 393k | 393k | 1.23M | 40.2 | 15.0 | 123 | 200 | 1.00× |" in md
    assert (tmp_path / "results.png").stat().st_size > 0
    exp = tmp_path / "expected.json"
    exp.write_text(json.dumps({"rows": {SFT_ROW: {"accuracy": 0.41, "tolerance": 0.02},
                                        "lightning": {"accuracy": 0.50, "tolerance": 0.02}},
                               "claims": [["lightning", SFT_ROW, 0.05]]}))
    assert check(tmp_path / "results.json", exp) == []
    exp.write_text(json.dumps({"rows": {"lightning": {"accuracy": 0.60, "tolerance": 0.02},
                                        "online": {"accuracy": 0.5, "tolerance": 0.1}},
                               "claims": [["lightning", SFT_ROW, 0.2]]}))
    fails = check(tmp_path / "results.json", exp)
    assert len(fails) == 3 and "outside 0.600 ± 0.020" in fails[0] and "missing" in fails[1] and "claim" in fails[2]


def test_check_cli_exit_codes(tmp_path):
    write_results(tmp_path, _results({SFT_ROW: [0.4, 0.4], "lightning": [0.5, 0.5]}))
    exp = tmp_path / "e.json"
    exp.write_text(json.dumps({"rows": {"lightning": {"accuracy": 0.5, "tolerance": 0.01}}}))
    ok = lopd_cli("repro", "check", "--expected", str(exp), "--results", str(tmp_path / "results.json"), check=False)
    assert ok.returncode == 0, ok.stderr
    exp.write_text(json.dumps({"rows": {"lightning": {"accuracy": 0.7, "tolerance": 0.01}}}))
    bad = lopd_cli("repro", "check", "--expected", str(exp), "--results", str(tmp_path / "results.json"), check=False)
    assert bad.returncode == 1 and "FAIL lightning" in bad.stderr
    exp.write_text("{}")
    broken = lopd_cli("repro", "check", "--expected", str(exp), "--results", str(tmp_path / "results.json"),
                      check=False)
    assert broken.returncode == 2 and len(broken.stderr.strip().splitlines()) == 1


def _tamper(path: Path) -> None:
    """Change one byte of ``path`` in place (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_published_report_and_metrics_are_read_verified(tmp_path):
    from lopd.layout import report_prefix, stage_prefix
    from lopd.manifest import publish
    from lopd.repro_cost import train_steps
    from lopd.repro_run import _train_seconds
    from lopd.runner import print_eval
    from lopd.store import IntegrityError, open_store

    recipe = load_recipe(TINY, [f"store={tmp_path / 'store'}"])
    store = open_store(recipe.store)
    report = report_prefix(stage_prefix(recipe.run_id, "eval"))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.json").write_text(json.dumps({"benchmarks": ["arith"], "results": {}}))
    (tmp_path / "report" / "report.md").write_text("| table |\n")
    publish(store, report, tmp_path / "report", stage="eval-report", run_id=recipe.run_id)
    (tmp_path / "opd").mkdir()
    (tmp_path / "opd" / "metrics.jsonl").write_text('{"step_time_s": 1.5, "sync_s": 0.5}\n{"step_time_s": 2.0}\n')
    publish(store, stage_prefix("r1", "opd"), tmp_path / "opd", stage="opd", run_id="r1")
    assert print_eval(recipe, QuietConsole()) == {"benchmarks": ["arith"], "results": {}}
    assert _train_seconds(train_steps(store, "r1", "opd")) == 4.0

    _tamper(tmp_path / "store" / report / "summary.json")  # a file store is read in place: the changed
    with pytest.raises(IntegrityError) as e:  # stat signature forces a rehash, which the bytes fail
        print_eval(recipe, QuietConsole())
    assert "\n" not in str(e.value) and str(e.value).startswith(store.url(f"{report}/summary.json"))
    _tamper(tmp_path / "store" / stage_prefix("r1", "opd") / "metrics.jsonl")
    with pytest.raises(IntegrityError, match=r"opd/metrics.jsonl: digest blake3:[0-9a-f]{64} does not match"):
        train_steps(store, "r1", "opd")


def test_diagnostics_are_seed_means_of_the_logged_series_and_plotted(tmp_path):
    from lopd.repro_plots import mean_series, write_diagnostics

    def rec(step, kl, rkl):
        return {"step": step, "kl_to_sft": kl, "reverse_kl_est": rkl}

    runs = [[rec(1, 0.0, 0.2), rec(2, 0.02, 0.1)],
            [rec(1, 0.0, 0.4), rec(2, 0.04, 0.3), rec(3, 0.05, 0.2)]]  # step 3: one seed only, left out
    d = mean_series(runs)
    assert d["step"] == [1.0, 2.0] and d["kl_to_sft"] == pytest.approx([0.0, 0.03])
    assert d["reverse_kl_est"] == pytest.approx([0.3, 0.2])
    assert mean_series([[{"step": 1, "loss": 1.0}]]) is None  # the SFT control logs neither
    results = {"run_id": "tiny", "seeds": [0, 1],
               "rows": {"sft": {"diagnostics": None}, "lightning": {"diagnostics": d}}}
    assert write_diagnostics(tmp_path, results).stat().st_size > 1000
    assert write_diagnostics(tmp_path / "none", {**results, "rows": {"sft": {}}}) is None


# ---------------------------------------------------------------------- rounds, top-k, rows and cost


def test_rounds_and_topk_variants_own_their_rollouts(tmp_path):
    s = study(tmp_path)
    sft, base = s.uri("tiny", "sft"), s.recipe.precompute
    for name, rounds, topk in (("rounds2", 2, 0), ("rounds4", 4, 0), ("topk", 1, 8), ("rounds2-topk", 2, 8)):
        r, _ = s.variant(name, 1)
        assert s.owns_rollouts(name) and r.precompute is not None, name
        assert r.precompute.student == sft and r.opd.student == sft and r.opd.rollouts is None, name
        assert r.precompute.teacher_topk == topk and r.opd.rounds == rounds, name
        assert (r.precompute.prompts, r.precompute.sampling) == (base.prompts, base.sampling), name
        assert (r.opd.train.seed, r.opd.online.sampling.seed, r.opd.train.steps) == (1, 1, s.recipe.opd.train.steps)
        assert r.sft_data is None and r.bootstrap is None and not r.allow_inconsistent_teacher, name
        assert r.models.teacher.uri == "runs/tiny-teacher/sft", name
        assert s.stage(name) == ("opd" if rounds == 1 else f"opd-r{rounds}"), name
    assert s.variant("topk", 0)[0].opd.objective == "topk"
    assert s.stages("rounds2", s.variant("rounds2", 0)[0]) == ["precompute", "opd", "precompute-r2", "opd-r2"]
    assert s.stages("topk", s.variant("topk", 0)[0]) == ["precompute", "opd"]
    assert s.stages("lightning", s.variant("lightning", 0)[0]) == ["opd"] and not s.owns_rollouts("lightning")
    assert s.stages("sft-continued", s.variant("sft-continued", 0)[0]) == ["sft"]
    r, _ = study(tmp_path, "repro.variants.rounds2.teacher=words").variant("rounds2", 0)
    assert r.models.teacher.uri == "runs/tiny-t-words-teacher/sft" and r.allow_inconsistent_teacher  # it scores
    with pytest.raises(RecipeError, match="no 'precompute' changes"):
        study(tmp_path, "repro.variants.sft-continued.precompute.teacher_topk=8")


def test_rows_select_rounds_and_topk_variants_in_the_variants_order(tmp_path):
    s = study(tmp_path, "repro.rows={topk,lightning,rounds2}")
    assert list(s.variants) == ["lightning", "rounds2", "topk"]
    labels = [c.split("=", 1)[0] for c in s.evaluation(0)[0].eval.checkpoints]
    assert labels == [SFT_ROW, "lightning", "rounds2", "topk"]
    with pytest.raises(RecipeError, match=r"^recipe error: repro.rows: .*unknown variant 'rounds3'") as e:
        study(tmp_path, "repro.rows={lightning,rounds3}")
    assert "\n" not in str(e.value)


@pytest.fixture
def recorded_runs(monkeypatch) -> list[tuple[str, ...]]:
    """``(run id, stage, ...)`` of every bootstrap, student init and stage run ``lopd.repro_run.run`` asks
    for, none run."""
    import lopd.bootstrap
    import lopd.repro_run
    import lopd.runner

    calls = []
    monkeypatch.setattr(lopd.bootstrap, "init_student", lambda r, dest, k: calls.append((str(dest), "init", k)))
    monkeypatch.setattr(lopd.runner, "run_bootstrap", lambda r, *a: calls.append((r.run_id, "bootstrap")))
    monkeypatch.setattr(lopd.runner, "run_stages", lambda r, f, stages, *a: calls.append((r.run_id, *stages)))
    monkeypatch.setattr(lopd.repro_run, "collect", lambda s: {})
    monkeypatch.setattr(lopd.repro_run, "write_results", lambda d, res: (d / "results.md").write_text("table\n"))
    return calls


def test_run_runs_every_round_of_the_rounds_and_topk_rows(tmp_path, recorded_runs):
    import lopd.repro_run

    calls = recorded_runs
    lopd.repro_run.run(str(TINY), (f"store={tmp_path}", *SHARED, "repro.rows={lightning,rounds2,topk}",
                                   "repro.variants.rounds2.teacher=words"), seeds=[3], console=QuietConsole())
    # teacher "words" is made, but no shared precompute: the only row it scores samples its own
    assert calls[:-1] == [("tiny", "bootstrap"), ("tiny", "sft-data", "sft", "precompute"),
                          ("tiny-t-words", "bootstrap"),
                          ("tiny-lightning-s3", "opd"),
                          ("tiny-rounds2-s3", "precompute", "opd", "precompute-r2", "opd-r2"),
                          ("tiny-topk-s3", "precompute", "opd")]
    assert calls[-1][0].startswith("tiny-eval") and calls[-1][1:] == ("eval",)


def test_run_makes_each_teacher_once_its_shared_precompute_only_for_offline_rows_and_the_kd_data(tmp_path,
                                                                                             recorded_runs):
    import lopd.repro_run

    calls = recorded_runs
    rows = "repro.rows={seqkd,inconsistent-redraw,online-redraw}"
    lopd.repro_run.run(str(TINY), (f"store={tmp_path}", *SHARED, rows), seeds=[0], console=QuietConsole())
    assert calls[:-1] == [("tiny", "bootstrap"), ("tiny", "sft-data", "sft", "precompute"),
                          ("tiny-t-redraw", "bootstrap"), ("tiny-kd", "sft-data"), ("tiny-p-redraw", "precompute"),
                          ("tiny-seqkd-s0", "sft"), ("tiny-inconsistent-redraw-s0", "opd"),
                          ("tiny-online-redraw-s0", "opd")]
    calls.clear()
    lopd.repro_run.run(str(TINY), (f"store={tmp_path}", *SHARED, "repro.rows={online-redraw}"), seeds=[0],
                       console=QuietConsole())
    assert ("tiny-p-redraw", "precompute") not in calls  # online OPD scores live: no shared precompute


def test_expected_file_follows_from_the_seed_variance_and_the_paired_differences(tmp_path):
    from lopd.repro_results import expected

    res = _results({SFT_ROW: [0.80, 0.82, 0.81], "lightning": [0.86, 0.88, 0.90], "online": [0.80, 0.85, 0.78]})
    res["seeds"] = [0, 1, 2]
    for name in ("lightning", "online"):
        res["rows"][name]["vs_sft"] = paired(res["rows"][name]["acc"], res["rows"][SFT_ROW]["acc"])
    exp = expected(res)
    assert exp["rows"]["lightning"]["tolerance"] == round(res["rows"]["lightning"]["accuracy"]["ci95"], 4)
    assert exp["rows"][SFT_ROW]["tolerance"] == round(max(res["rows"][SFT_ROW]["accuracy"]["ci95"], 0.01), 4)
    d = res["rows"]["lightning"]["vs_sft"]
    assert exp["claims"] == [["lightning", SFT_ROW, pytest.approx(d["mean"] - d["ci95"], abs=1e-3)]]  # online: not
    write_results(tmp_path, res)
    out = tmp_path / "expected.json"
    ok = lopd_cli("repro", "expect", "--results", str(tmp_path / "results.json"), "-o", str(out))
    assert ok.returncode == 0 and json.loads(out.read_text())["claims"] == json.loads(json.dumps(exp))["claims"]
    assert check(tmp_path / "results.json", out) == []  # a study passes the file it implies
    bad = lopd_cli("repro", "expect", "--results", str(tmp_path / "nope.json"), "-o", str(out), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1

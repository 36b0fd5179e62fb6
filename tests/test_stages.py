"""The stage registry is the single source of the stage concept: a stage added to it (and to
nothing else) shows up in the CLI, the local runner, the Kubernetes plan and status, and the
rendered Helm values and objects."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from lopd import LopdError, stages
from lopd.recipe import load_recipe
from lopd.stages import STAGES, Stage, stages_of
from tests.helpers.cli import REPO

TINY = REPO / "jobs" / "recipes" / "tiny.yaml"


def test_registry_rows():
    assert list(STAGES) == ["sft-data", "sft", "precompute", "opd", "eval"]
    assert [s for s, spec in STAGES.items() if spec.training] == list(stages.TRAINING_STAGES) == ["sft", "opd"]
    r = load_recipe(TINY)
    assert stages_of(r) == list(STAGES)
    assert {s: STAGES[s].inputs(r) for s in STAGES} == {
        "sft-data": [], "sft": ["sft-data"], "precompute": ["sft"], "opd": ["precompute"], "eval": ["opd"]}
    online = load_recipe(TINY, ["opd.mode=online"])
    assert STAGES["opd"].inputs(online) == ["sft"]
    assert STAGES["sft"].shards(r) == 1 and STAGES["eval"].shards(r) == r.eval.shards
    for spec in STAGES.values():  # every entrypoint exists
        assert (REPO / "jobs" / f"{spec.module}.py").is_file(), spec.name
    with pytest.raises(LopdError, match="unknown stage 'nope' \\(one of sft-data, sft, precompute, opd, eval;"):
        stages.get("nope")


@pytest.fixture
def audit(monkeypatch):
    """A fake inference stage after eval, configured by the eval section, entrypoint jobs.audit."""
    spec = Stage("audit", "eval", "audit", False, lambda r, k: ("opd", "eval"), "a fake stage")
    monkeypatch.setitem(STAGES, "audit", spec)
    return spec


def test_a_new_registry_row_reaches_every_consumer(audit, tmp_path):
    from lopd.cli import main
    from lopd.k8s import helm
    from lopd.k8s.pipeline import plan
    from lopd.k8s.status import run_status
    from lopd.runner import stage_command
    from lopd.store import open_store

    r = load_recipe(TINY)
    assert stages_of(r)[-1] == "audit" and audit.inputs(r) == ["opd", "eval"]
    # the CLI: listed, and accepted as a STAGE argument by run/render/deploy/logs
    cli = CliRunner()
    assert cli.invoke(main, ["stages", "--names"]).output.split() == [*stages_of(r)]
    out = cli.invoke(main, ["render", "audit", "-r", str(TINY)])
    assert out.exit_code == 0, out.output
    assert "module: jobs.audit" in out.output and "training: false" in out.output
    # the local runner: the same entrypoint the pod runs
    assert stage_command("audit", "r.yaml", ("a=1",), ["--shard-index", "0"]) == [
        sys.executable, "-m", "jobs.audit", "--recipe", "r.yaml", "--set", "a=1", "--shard-index", "0"]
    # the Kubernetes pipeline's plan and `lopd status`
    store = open_store(str(tmp_path / "store"))
    assert [(s.stage, s.inputs) for s in plan(r, store)][-1] == ("audit", ["opd", "eval"])
    assert [row.stage for row in run_status(r, store, None, None)][-1] == "audit"
    # the rendered objects: an Indexed Job running python -m jobs.audit over eval's shards
    _, release, rendered = helm.render_stage(r, "audit")
    job = next(o for o in helm.objects(rendered) if o["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "jobs.audit"] and job["spec"]["completions"] == r.eval.shards
    assert release.endswith("-audit")


def test_training_row_renders_torchrun(monkeypatch):
    """The chart decides torchrun vs shards from the registry's ``training`` value, not a list of names."""
    from lopd.k8s import helm

    monkeypatch.setitem(STAGES, "distil2", Stage("distil2", "opd", "opd", True, lambda r, k: ("opd",)))
    _, _, rendered = helm.render_stage(load_recipe(TINY), "distil2")
    job = next(o for o in helm.objects(rendered) if o["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("-m", 3) + 1] == "jobs.opd" and "--num-shards" not in cmd


def test_rounds_make_stage_instances_in_run_order():
    """``opd.rounds: 3``: precompute and opd repeat per round as their own instances; eval reads
    the last round; every consumer resolves an instance to its registry row."""
    r = load_recipe(TINY, ["opd.rounds=3"])
    assert stages_of(r) == ["sft-data", "sft", "precompute", "opd", "precompute-r2", "opd-r2", "precompute-r3",
                            "opd-r3", "eval"]
    assert {s: stages.inputs_of(r, s) for s in stages_of(r)[2:]} == {
        "precompute": ["sft"], "opd": ["precompute"], "precompute-r2": ["opd"], "opd-r2": ["precompute-r2", "opd"],
        "precompute-r3": ["opd-r2"], "opd-r3": ["precompute-r3", "opd-r2"], "eval": ["opd-r3"]}
    assert stages.get("opd-r3") is STAGES["opd"] and stages.split("precompute-r12") == ("precompute", 12)
    for bad in ("opd-r1", "opd-r02", "sft-r2", "eval-r2", "opd-r"):
        with pytest.raises(LopdError, match=f"unknown stage '{bad}'"):
            stages.get(bad)
    # one round is the paper's pipeline, unchanged; online OPD has no rounds
    assert stages_of(load_recipe(TINY, ["opd.rounds=1"])) == list(STAGES)


def test_rounds_recipe_errors_are_one_line():
    from lopd.recipe import RecipeError

    for sets, msg in ((["opd.rounds=2", "opd.mode=online"], "Lightning rounds are offline OPD"),
                      (["opd.rounds=2", "opd.rollouts=runs/x/precompute"], "rollouts must be unset"),
                      (["opd.rounds=9", "opd.train.steps=8"], "9 rounds need at least as many train.steps"),
                      (["opd.rounds=65"], "less than or equal to 64")):
        with pytest.raises(RecipeError, match=msg) as e:
            load_recipe(TINY, sets)
        assert "\n" not in str(e.value)


def test_rounds_stage_instances_run_with_their_round(tmp_path):
    """The local command and the rendered pod run the stage's entrypoint with ``--round``."""
    from lopd.k8s import helm
    from lopd.runner import stage_command

    assert stage_command("precompute-r2", "r.yaml", (), ["--shard-index", "0"]) == [
        sys.executable, "-m", "jobs.precompute", "--recipe", "r.yaml", "--shard-index", "0", "--round", "2"]
    r = load_recipe(TINY, ["opd.rounds=2"])
    _, release, rendered = helm.render_stage(r, "opd-r2")
    job = next(o for o in helm.objects(rendered) if o["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert release.endswith("-opd-r2") and cmd[cmd.index("jobs.opd"):][-2:] == ["--round", "2"]
    bad = CliRunner().invoke(__import__("lopd.cli", fromlist=["main"]).main,
                             ["render", "opd-r3", "-r", str(TINY), "--set", "opd.rounds=2"])
    assert bad.exit_code == 2 and "opd.rounds is 2, so the run has no stage opd-r3" in bad.output

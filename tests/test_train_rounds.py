"""Lightning rounds in the opd entrypoint (``opd.rounds``): round 2 continues round 1's training
state exactly, resumes after a kill inside round 2, and refuses rollouts its starting checkpoint
did not sample.

The identity: when every round's rollouts are the same rows, R = 2 rounds make exactly the
batches, learning rates and Adam updates of one uninterrupted run (data order is by global step,
the schedule spans all rounds, round 2 restores round 1's fp32 master weights and moments), so the
final weights are bit-identical. The rollouts are published with the real schema and manifests
(:mod:`tests.helpers.training`); the real entrypoint runs in subprocesses.
"""

from __future__ import annotations

import pytest
import yaml

from lopd.fingerprint import fingerprint
from lopd.layout import checkpoint_prefix, stage_prefix
from lopd.manifest import read_manifest
from lopd.store import open_store
from tests.helpers.training import (
    RUN,
    final_weights,
    make_run,
    precompute_rows,
    publish_precompute,
    read_metrics,
    run_job,
)

TRAIN = {"steps": 6, "checkpoint_every": 2}


def make_rounds_run(tmp, opd_models, rows, **opd):
    """:func:`make_run` whose recipe has a precompute section (Lightning rounds need one; the
    rollouts here are published by the test, so its prompts are never read)."""
    recipe, store_uri = make_run(tmp, opd_models, rows, **opd)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "precompute": {"prompts": "unused.jsonl"}}))
    return recipe, store_uri


@pytest.fixture(scope="module")
def rows(opd_models):
    student, teacher = opd_models
    return precompute_rows(student, teacher, 24, 384, seed=3)


def _round2_rollouts(store_uri: str, tmp, rows, sampled_by: str) -> None:
    """Publish ``rows`` as round 2's precompute, sampled by the model at ``sampled_by``."""
    tfp = read_manifest(open_store(store_uri), stage_prefix(RUN, "precompute"))[0].lineage["teacher_fingerprint"]
    publish_precompute(store_uri, rows, tmp, {
        "teacher_fingerprint": tfp, "sft_teacher_fingerprint": tfp, "teacher_consistent": True,
        "allow_inconsistent_teacher": False, "student_fingerprint": fingerprint(sampled_by), "student": sampled_by,
        "round": 2, "rounds": 2}, stage="precompute-r2")


def test_rounds_continue_exactly_and_resume_a_kill_in_round_2(tmp_path, opd_models, rows):
    base_recipe, base_uri = make_run(tmp_path / "one", opd_models, rows, train=TRAIN, mini_batches=1)
    run_job("jobs.opd", base_recipe)

    recipe, store_uri = make_rounds_run(tmp_path / "two", opd_models, rows, train=TRAIN, mini_batches=1, rounds=2)
    run_job("jobs.opd", recipe)  # round 1: steps 1-3, then the state after step 3
    store = open_store(store_uri)
    r1, _ = read_manifest(store, stage_prefix(RUN, "opd"))
    assert r1.lineage["round"] == 1 and r1.metrics["steps"] == 3
    assert r1.lineage["final_checkpoint"] == checkpoint_prefix(stage_prefix(RUN, "opd"), 3)
    opd1 = store.url(stage_prefix(RUN, "opd"))
    _round2_rollouts(store_uri, tmp_path / "two", rows, opd1)

    killed = run_job("jobs.opd", recipe, "--round", "2", env={"LOPD_FAULT_KILL_AFTER_STEP": "5"}, check=False)
    assert killed.returncode == -9 and '"step": 3' in killed.stderr  # continued from round 1's step 3
    assert not store.exists(f"{stage_prefix(RUN, 'opd-r2')}/MANIFEST.json")
    resumed = run_job("jobs.opd", recipe, "--round", "2")
    assert '"event": "resume"' in resumed.stderr and '"step": 4' in resumed.stderr  # round 2's own checkpoint

    r2, _ = read_manifest(store, stage_prefix(RUN, "opd-r2"))
    assert r2.lineage["round"] == 2 and r2.lineage["final_checkpoint"] is None
    assert r2.lineage["continued_from"].endswith("opd/checkpoints/step-000003")
    assert r2.lineage["student_fingerprint"] == fingerprint(opd1)
    hist, base = read_metrics(store_uri, "opd-r2"), read_metrics(base_uri)
    assert [h["step"] for h in hist] == list(range(1, 7))
    assert [h["lr"] for h in hist] == [h["lr"] for h in base]
    wa, wb = final_weights(base_uri, tmp_path / "one"), final_weights(store_uri, tmp_path / "two", "opd-r2")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0


def test_rounds_refuse_rollouts_their_starting_checkpoint_did_not_sample(tmp_path, opd_models, rows):
    recipe, store_uri = make_rounds_run(tmp_path, opd_models, rows, train={**TRAIN, "steps": 2}, mini_batches=1,
                                        rounds=2)
    run_job("jobs.opd", recipe)
    sft = open_store(store_uri).url(stage_prefix(RUN, "sft"))
    _round2_rollouts(store_uri, tmp_path, rows, sft)  # sampled by the SFT student, not round 1's output
    proc = run_job("jobs.opd", recipe, "--round", "2", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: opd.student:") and "is not the model that sampled" in err
    assert fingerprint(sft) in err


def test_rounds_refuse_a_round_the_recipe_does_not_have(tmp_path, opd_models, rows):
    recipe, _ = make_rounds_run(tmp_path, opd_models, rows, train=TRAIN, rounds=2)
    proc = run_job("jobs.opd", recipe, "--round", "3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: --round 3: opd runs in round 1..2 (opd.rounds)"
    sft = run_job("jobs.sft", recipe, "--round", "2", check=False)
    assert sft.returncode == 2 and "not repeated per Lightning round" in sft.stderr

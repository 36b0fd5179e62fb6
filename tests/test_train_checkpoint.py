"""Resumable checkpoints (lopd.train.checkpoint): a 2-rank ZeRO-3 SFT run killed mid-way resumes
from its last checkpoint to the same weights as an uninterrupted run.

The single-rank kill / resume of each stage is in tests/test_train_sft.py and tests/test_train_opd.py.
"""

from __future__ import annotations

from tests.helpers.training import RUN, final_weights, read_metrics, run_job, sft_recipe


def test_two_ranks_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_model):
    """SFT on 2 ranks (torchrun, gloo, ZeRO-3, packed rows): SIGKILL after step 3 (checkpoint at 2),
    rerun: it resumes from step 2 and ends bit-identical to an uninterrupted 2-rank run."""
    train = {"steps": 4, "checkpoint_every": 2, "zero_stage": 3}
    base_recipe, base_uri = sft_recipe(tmp_path / "full", tiny_model, **train)
    run_job("jobs.sft", base_recipe, nproc=2)
    recipe, uri = sft_recipe(tmp_path / "killed", tiny_model, **train)
    killed = run_job("jobs.sft", recipe, nproc=2, env={"LOPD_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0 and '"event": "fault-injection"' in killed.stderr, killed.stderr[-2000:]
    from lopd.layout import stage_prefix
    from lopd.store import open_store

    assert not open_store(uri).exists(f"{stage_prefix(RUN, 'sft')}/MANIFEST.json")
    resumed = run_job("jobs.sft", recipe, nproc=2)
    assert '"event": "resume"' in resumed.stderr and '"step": 2' in resumed.stderr
    wa, wb = final_weights(base_uri, tmp_path / "full", "sft"), final_weights(uri, tmp_path / "killed", "sft")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0
    a, b = read_metrics(base_uri, "sft"), read_metrics(uri, "sft")
    assert [h["step"] for h in b] == [1, 2, 3, 4]
    assert [h["loss"] for h in a] == [h["loss"] for h in b]


def test_resume_refuses_a_checkpoint_of_another_base_or_recipe(tmp_path, tiny_model):
    """SFT killed after step 3 (checkpoint at 2). Rerun under a changed learning rate: refused,
    naming both recipe hashes; rerun from other base weights at the same path: refused, naming
    both fingerprints; with --force it starts over and publishes."""
    import shutil

    from lopd.fingerprint import fingerprint_local
    from lopd.recipe import load_recipe
    from tests.helpers.training import scale_weights

    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    recipe, uri = sft_recipe(tmp_path, student, steps=4, checkpoint_every=2)
    killed = run_job("jobs.sft", recipe, env={"LOPD_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0 and '"event": "fault-injection"' in killed.stderr, killed.stderr[-2000:]

    def refused(*extra: str) -> str:
        res = run_job("jobs.sft", recipe, *extra, check=False)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        return errors[0]

    lr = "sft.optim.lr=1e-3"
    old, new = load_recipe(recipe).sha256(), load_recipe(recipe, [lr]).sha256()
    err = refused("--set", lr)
    assert f"recipe sha256 {old}" in err and f"this run's is {new}" in err and "--force starts over" in err

    base = fingerprint_local(student)
    shutil.rmtree(student)
    scale_weights(tiny_model, student, 0.5)
    err = refused()
    assert f"base model {base}" in err and f"starts from {fingerprint_local(student)}" in err
    assert "--force starts over" in err
    forced = run_job("jobs.sft", recipe, "--force")
    assert '"event": "resume"' not in forced.stderr
    assert [h["step"] for h in read_metrics(uri, "sft")] == [1, 2, 3, 4]

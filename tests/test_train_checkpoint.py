"""Resumable checkpoints (lopd.train.checkpoint): a 2-rank ZeRO-3 SFT run killed mid-way resumes
from its last checkpoint to the same weights as an uninterrupted run; a bf16 run (ZeRO 0, 2, 3)
resumed from a checkpoint continues exactly as the uninterrupted run (fp32 master weights and
Adam state restored bit for bit).

The single-rank kill / resume of each stage is in tests/test_train_sft.py and tests/test_train_opd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.cli import REPO
from tests.helpers.training import RUN, conversations, final_weights, read_metrics, run_job, sft_recipe


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


def _run_steps(engine, seqs, cfg, first: int, last: int) -> dict:
    """SFT steps ``first .. last-1`` of a 4-step cosine schedule, then the full fp32 state."""
    from lopd.train import checkpoint as ckpt
    from lopd.train.engine import lr_at
    from lopd.train.sft import sft_step

    for s in range(first, last):
        sft_step(engine, seqs, cfg, lr_at(s, 4, cfg.optim), 1)
    weights, moments = ckpt.gather_state(engine)
    lp = {k: v.detach().clone() for k, v in engine.module.lm.state_dict().items()} \
        if cfg.train.zero_stage < 3 else {}  # ZeRO-3 partitions the bf16 weights themselves
    return {"w": weights, "m": moments, "lp": lp, "step": ckpt._adam_step(engine)}


def _gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def bf16_resume_child(model_dir: str, work: str, stages: str) -> None:
    """Per ZeRO stage: 4 bf16 SFT steps at lr 2e-6 (1 rank, gloo, CPU), with a checkpoint
    published after step 2; then a fresh engine resumed from it the way a killed run resumes
    (weights loaded in bf16 before wrapping, then :func:`lopd.train.checkpoint.restore`) runs
    steps 3-4. Prints, per stage, the largest gaps to the uninterrupted run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.recipe import SftConfig
    from lopd.store import open_store
    from lopd.train import checkpoint as ckpt
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.sft_rows import encode_sft_row

    init_distributed()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [encode_sft_row(tok, c, 128, f"row {i}") for i, c in enumerate(conversations(8))]
    store, root = open_store(f"file://{work}/store"), Path(work)
    out = {}
    for stage in (int(s) for s in stages.split(",")):
        cfg = SftConfig(optim={"lr": 2e-6, "weight_decay": 0.1, "schedule": "cosine"},
                        train={"zero_stage": stage, "micro_batch_tokens": 160, "global_batch": 8, "steps": 4,
                               "gradient_checkpointing": False})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        engine = build_engine(model, cfg.train, cfg.optim)
        assert engine.bfloat16_enabled() and next(engine.module.parameters()).dtype == torch.bfloat16
        start = _run_steps(engine, seqs, cfg, 0, 2)
        prefix = ckpt.save_checkpoint(engine, tok, store, f"z{stage}", 2, {}, root, stage="sft-checkpoint",
                                      run_id="t")
        full = _run_steps(engine, seqs, cfg, 2, 4)
        local = ckpt.fetch_checkpoint(store, prefix, root / f"resume-{stage}")
        engine = build_engine(AutoModelForCausalLM.from_pretrained(local, dtype=torch.bfloat16), cfg.train,
                              cfg.optim)
        ckpt.restore(engine, local)
        restored = _run_steps(engine, seqs, cfg, 2, 2)
        resumed = _run_steps(engine, seqs, cfg, 2, 4)
        out[stage] = {"restored_master": _gap(restored["w"], start["w"]),
                      "restored_moments": _gap(restored["m"], start["m"]),
                      "master": _gap(resumed["w"], full["w"]), "moments": _gap(resumed["m"], full["m"]),
                      "lp": _gap(resumed["lp"], full["lp"]) if stage < 3 else 0.0,
                      "moved": _gap(full["w"], start["w"]), "steps": [full["step"], resumed["step"]]}
    print(json.dumps(out))


def test_bf16_resume_restores_master_weights_and_equals_uninterrupted(tmp_path, tiny_model):
    """bf16 on CPU (gloo, 1 rank), lr 2e-6: every update is far below bf16 resolution, so only the
    fp32 master weights carry the training. After restoring a checkpoint into a fresh engine, the
    master weights and Adam moments equal those saved, bit for bit (the bf16 weights alone would
    round them back to the starting values), and two more steps end exactly where the
    uninterrupted run does: master weights, Adam moments, bf16 weights and step count."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_checkpoint", "--bf16-resume-child",
                           str(tiny_model), str(tmp_path), "0,1,2,3"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(res) == ["0", "1", "2", "3"]
    for stage, r in res.items():
        assert 0.0 < r["moved"] < 1e-4, (stage, r)  # the run trained, below bf16 resolution of the weights
        gaps = {k: r[k] for k in ("restored_master", "restored_moments", "master", "moments", "lp")}
        assert gaps == dict.fromkeys(gaps, 0.0), (stage, r)
        assert r["steps"][0] == r["steps"][1] > 0, (stage, r)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bf16-resume-child"]:
        bf16_resume_child(*sys.argv[2:5])

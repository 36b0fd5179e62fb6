"""Offline (Lightning) OPD on DeepSpeed: end to end through jobs/opd.py on tiny models.

An SFT checkpoint and precompute parquet are published with the real schemas and manifests
(:func:`tests.helpers.training.make_run`; the other stages' jobs are not needed), then the real
entrypoint runs in subprocesses (torchrun for 2 ranks, gloo): metrics and lineage, 2 ranks
ZeRO-3 == 1 rank, kill and resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lopd.layout import stage_prefix
from lopd.manifest import read_manifest
from lopd.store import open_store
from tests.helpers.cli import REPO
from tests.helpers.training import RUN, final_weights, make_run, precompute_rows, read_metrics, run_job


@pytest.fixture(scope="module")
def rows(opd_models):
    student, teacher = opd_models
    rows = precompute_rows(student, teacher, 24, 384)
    rows["finish_reason"] = ["length" if i % 4 == 1 else "stop" for i in range(24)]  # cut at max_tokens
    return rows


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, opd_models, rows):
    """One uninterrupted 1-rank ZeRO-0 run (6 steps of the full 24 rollouts in 2 PPO mini-batches,
    2 checkpoints)."""
    tmp = tmp_path_factory.mktemp("opd-baseline")
    recipe, store_uri = make_run(tmp, opd_models, rows)
    proc = run_job("jobs.opd", recipe)
    return recipe, store_uri, tmp, proc


def test_offline_opd_end_to_end_metrics_and_lineage(baseline, tmp_path):
    recipe, store_uri, _, _ = baseline
    m, _ = read_manifest(open_store(store_uri), stage_prefix(RUN, "opd"))
    names = {f.path for f in m.files}
    assert {"model.safetensors", "config.json", "metrics.jsonl", "curves.png", "tokenizer.json"} <= names
    assert any(n.startswith("tensorboard/") for n in names)
    assert m.lineage["teacher_consistent"] is True and m.lineage["teacher_fingerprint"]
    assert m.inputs["precompute"].manifest_sha256
    assert m.metrics["truncated_rollouts"] == 6 and m.metrics["rows"] == 24  # kept, and counted
    hist = read_metrics(store_uri)
    assert [h["step"] for h in hist] == list(range(1, 7))
    for k in ("loss", "adv_mean", "reverse_kl_est", "kl_to_sft", "clip_frac", "entropy", "grad_norm",
              "tokens_per_s", "lr"):
        assert all(np.isfinite(h[k]) for h in hist), k
    # full-batch steps towards the teacher on fixed rollouts: the gap shrinks every step
    gaps = [h["reverse_kl_est"] for h in hist]
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert hist[0]["kl_to_sft"] < 0.1 * hist[-1]["kl_to_sft"]  # starts at the SFT policy
    # 2 PPO mini-batches per batch: the second update is off-policy, and the clip acts on it
    assert any(h["clip_frac"] > 0 for h in hist)
    assert hist[-1]["kl_to_sft"] > 1e-3
    ckpts = {o.key.split("/")[-2] for o in open_store(store_uri).list(f"{stage_prefix(RUN, 'opd')}/checkpoints")
             if o.key.endswith("MANIFEST.json")}
    assert ckpts == {"step-000002", "step-000004"}
    from transformers import AutoModelForCausalLM

    from lopd.manifest import fetch

    AutoModelForCausalLM.from_pretrained(fetch(open_store(store_uri), stage_prefix(RUN, "opd"), tmp_path / "f"))
    again = run_job("jobs.opd", recipe)  # re-running a published stage is a no-op
    assert "already published" in again.stderr


@pytest.mark.parametrize("sampling,fields", [
    ({"temperature": 0.7, "top_p": 1.0}, {}), ({"temperature": 1.0, "top_p": 0.9}, {}),
    ({"temperature": 0.7, "top_p": 0.9}, {"importance_weights": {"enabled": False}, "kl_coef": 0.5}),
])
def test_importance_weights_and_kl_refused_on_tempered_rollouts(sampling, fields):
    """Raw rollout log-probs of rollouts sampled at T != 1 or top-p < 1 are not the sampling
    distribution's: importance weights and the KL guard are refused, naming the fields."""
    from lopd.recipe import OpdConfig, SamplingConfig
    from lopd.train.data import TrainDataError
    from lopd.train.offline import check_rollout_logprobs

    cfg = OpdConfig(**{"importance_weights": {"enabled": True}, **fields})
    lineage = {"rollout_logprobs": "raw", "sampling": sampling}
    with pytest.raises(TrainDataError) as e:
        check_rollout_logprobs(cfg, lineage)
    msg = str(e.value)
    assert "precompute.sampling.temperature=" in msg and "\n" not in msg
    assert ("opd.kl_coef" in msg) == ("kl_coef" in fields) and ("importance_weights" in msg) != ("kl_coef" in fields)
    # untempered rollouts, or neither option: accepted; data without the record falls back to the recipe
    check_rollout_logprobs(cfg, {"rollout_logprobs": "raw", "sampling": {"temperature": 1.0, "top_p": 1.0}})
    check_rollout_logprobs(OpdConfig(), lineage)
    with pytest.raises(TrainDataError, match="top_p=0.9"):
        check_rollout_logprobs(cfg, {}, SamplingConfig(temperature=1.0, top_p=0.9))
    check_rollout_logprobs(cfg, {})


def test_tempered_precompute_lineage_is_checked_when_the_source_opens(tmp_path, opd_models, rows):
    """OfflineSource.from_run reads the precompute lineage and refuses before resolving any model."""
    from types import SimpleNamespace

    from lopd.recipe import load_recipe
    from lopd.train.data import TrainDataError
    from lopd.train.offline import OfflineSource

    lineage = {"teacher_consistent": True, "rollout_logprobs": "raw", "sampling": {"temperature": 0.7, "top_p": 0.9}}
    recipe_path, uri = make_run(tmp_path, opd_models, rows, lineage=lineage, importance_weights={"enabled": True})
    recipe = load_recipe(recipe_path, ["opd.student=/nonexistent/model"])  # never reached
    run = SimpleNamespace(recipe=recipe, section=recipe.opd, store=open_store(uri), stage="opd", round=1)
    with pytest.raises(TrainDataError, match=r"^opd\.importance_weights\.enabled: .*temperature=0\.7, top_p=0\.9"):
        OfflineSource.from_run(run)


def test_two_ranks_zero3_match_one_rank(tmp_path, opd_models, rows):
    """2 ranks (gloo) with ZeRO-3 and the same global batch == 1 rank ZeRO-0, step by step.

    Both runs are on-policy (one PPO mini-batch per batch: the ratio is exactly 1), so nothing
    discontinuous (a token crossing the clip boundary) turns rounding into a different update.
    What differs is only the fp32 summation order (gloo all-reduce, ZeRO-3 partitions, each
    rank's packed micro-batches): step 1 starts from the same weights, so it must agree to
    rounding (seen: 7e-9 relative). Later steps start from weights that already differ by
    rounding, which Adam can amplify (an element whose gradient is ~0 moves by up to lr), so
    they are bounded by that drift (seen: loss 2e-6, grad norm 2e-5, weights 1.2e-6 after 6
    steps) with a 40x margin. A real bug (a missed all-reduce, a wrong normaliser, a stale
    partition) changes step 1's loss or gradient norm by far more than 1e-5.
    """
    runs = []
    for name, nproc, zero in (("one-rank", 1, 0), ("two-ranks", 2, 3)):
        recipe, uri = make_run(tmp_path / name, opd_models, rows, mini_batches=1, train={"zero_stage": zero})
        run_job("jobs.opd", recipe, nproc=nproc)
        runs.append((read_metrics(uri), final_weights(uri, tmp_path / name)))
    (a, wa), (b, wb) = runs
    assert [x["step"] for x in a] == [y["step"] for y in b] == list(range(1, 7))
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    for x, y in zip(a[1:], b[1:], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3), x["step"]
    lr = 5e-4
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < lr / 10


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, opd_models, rows):
    """SIGKILL after step 3 (checkpoint at 2), rerun: resumes from step 2 and ends bit-identical
    to an uninterrupted run (ZeRO-2: weights and Adam moments re-scattered into the partitions)."""
    base_recipe, base_uri = make_run(tmp_path / "full", opd_models, rows, train={"zero_stage": 2})
    run_job("jobs.opd", base_recipe)
    base_tmp = tmp_path / "full"
    recipe, store_uri = make_run(tmp_path, opd_models, rows, train={"zero_stage": 2})
    killed = run_job("jobs.opd", recipe, env={"LOPD_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode == -9
    assert not open_store(store_uri).exists(f"{stage_prefix(RUN, 'opd')}/MANIFEST.json")
    resumed = run_job("jobs.opd", recipe)
    assert '"event": "resume"' in resumed.stderr and '"step": 2' in resumed.stderr
    wa, wb = final_weights(base_uri, base_tmp), final_weights(store_uri, tmp_path)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0
    assert [h["step"] for h in read_metrics(store_uri)] == list(range(1, 7))


# --------------------------------------------------------------------------- the log p_old pass


def _samples(vocab: int, n: int = 8, seed: int = 0):
    """Random rollouts with teacher and rollout log-probs (the identities below hold for any)."""
    from lopd.train.data import OpdSample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = rng.integers(3, vocab, int(rng.integers(3, 8))), rng.integers(3, vocab, int(rng.integers(4, 12)))
        teacher, rollout = (rng.standard_normal((2, len(r))) - 3.0).astype(np.float32)
        out.append(OpdSample(f"p{i:02d}", 0, p, r, teacher, rollout))
    return out


def test_one_mini_batch_old_logprobs_from_the_training_forward_equal_the_no_grad_pass(opd_models):
    """float64, every loss term on (importance weights, KL penalty): with ``log p_old = sg(log p)`` of
    the training forward, each micro-batch's loss, the accumulated gradient and every summed stat
    (loss, advantage, kl_to_sft, clip count, entropy) equal those with ``log p_old`` from the separate
    no-grad pass, and the ratio is exactly 1 (nothing clipped)."""
    from transformers import AutoModelForCausalLM

    from lopd.recipe import OpdConfig
    from lopd.train.engine import LogprobModel, forward_logprobs
    from lopd.train.opd import Counts, batch_seqs, opd_micro_loss
    from lopd.train.packing import make_micro_batches

    model = AutoModelForCausalLM.from_pretrained(opd_models[0], dtype=torch.float64)
    engine = LogprobModel(model, chunk_size=5)
    samples = _samples(model.config.vocab_size)
    cfg = OpdConfig(kl_coef=0.1, importance_weights={"enabled": True, "cap": 2.0})
    mbs = make_micro_batches(batch_seqs(samples, 0), 40, packing=True)
    assert len(mbs) > 1
    counts = Counts(float(sum(mb.num_targets for mb in mbs)), float(len(samples)), 1)

    def run(from_current: bool):
        model.zero_grad(set_to_none=True)
        losses, stats = [], {}
        for mb in mbs:
            mb.extras.pop("old_logprobs", None)
            if not from_current:
                with torch.no_grad():
                    mb.extras["old_logprobs"] = forward_logprobs(engine, mb, entropy=False)[0].float()
            loss, s = opd_micro_loss(engine, mb, cfg, counts, old_from_current=from_current)
            loss.backward()
            losses.append(loss.detach())
            stats = {k: stats[k] + v if k in stats else v for k, v in s.items()}
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return torch.stack(losses), {k: float(v) for k, v in stats.items()}, grads

    loss_a, stats_a, grad_a = run(from_current=True)
    loss_b, stats_b, grad_b = run(from_current=False)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-15)
    assert grad_a.norm() > 0 and stats_a.keys() == stats_b.keys()
    for k in stats_a:
        assert stats_a[k] == pytest.approx(stats_b[k], rel=1e-12, abs=1e-15), k
    assert stats_a["clip_sum"] == 0.0 and stats_a["kl_sum"] > 0 and stats_a["ent_sum"] > 0


def old_pass_child(model_dir: str) -> None:
    """One OPD step through DeepSpeed (1 rank, gloo, fp32) per variant: one mini-batch with the
    ``log p_old`` pass skipped (the default) or forced, and two mini-batches (the default: the pass);
    prints metrics, decoder forward calls, micro-batch counts and the weights' gap."""
    from transformers import AutoModelForCausalLM

    from lopd.recipe import OpdConfig
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.opd import batch_seqs, opd_step, split_minis
    from lopd.train.packing import make_micro_batches

    init_distributed()
    cfg = OpdConfig(kl_coef=0.1, optim={"lr": 1e-3, "weight_decay": 0.0},
                    train={"zero_stage": 0, "gradient_checkpointing": False, "micro_batch_tokens": 40,
                           "global_batch": 8, "steps": 1})
    out, weights = {}, {}
    for name, minis, old_pass in (("skip", 1, None), ("pass", 1, True), ("two_minis", 2, None)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        samples = _samples(model.config.vocab_size)
        engine = build_engine(model, cfg.train, cfg.optim, chunk_size=4)
        calls = [0]
        model.model.register_forward_pre_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        parts = split_minis(samples, minis, 0, 1)
        m = opd_step(engine, parts, cfg, 1e-3, 1, old_pass=old_pass)
        out[name] = {"metrics": m, "forward_calls": calls[0],
                     "micro_batches": sum(len(make_micro_batches(batch_seqs(p, 0), 40)) for p in parts)}
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["max_weight_diff"] = max(float((weights["skip"][k] - weights["pass"][k]).abs().max()) for k in weights["skip"])
    print(json.dumps(out))


def test_old_logprob_pass_skipped_only_for_one_mini_batch_and_the_step_is_unchanged(opd_models):
    """Through the real engine and ``opd_step``: one mini-batch runs one forward per micro-batch (no
    ``log p_old`` pass) and gives the same metrics and updated weights as with the pass forced
    (fp32, same kernels: rounding at most); two mini-batches still run the pass (two forwards each)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_opd", "--old-pass-child", str(opd_models[0])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    skip, forced, two = res["skip"], res["pass"], res["two_minis"]
    assert skip["micro_batches"] > 1 and skip["micro_batches"] == forced["micro_batches"]
    assert skip["forward_calls"] == skip["micro_batches"]
    assert forced["forward_calls"] == 2 * forced["micro_batches"]
    assert two["forward_calls"] == 2 * two["micro_batches"]
    for k in ("loss", "adv_mean", "reverse_kl_est", "kl_to_sft", "clip_frac", "entropy", "grad_norm",
              "response_tokens"):
        assert skip["metrics"][k] == pytest.approx(forced["metrics"][k], rel=1e-6, abs=1e-9), k
    assert skip["metrics"]["clip_frac"] == 0.0 and skip["metrics"]["grad_norm"] > 0
    assert res["max_weight_diff"] <= 1e-7
    assert two["metrics"]["clip_frac"] > 0  # the second mini-batch's log p_old is the batch start's: off-policy


if __name__ == "__main__":
    if sys.argv[1:2] == ["--old-pass-child"]:
        old_pass_child(sys.argv[2])

"""Offline (Lightning) OPD on DeepSpeed: end to end through jobs/opd.py on tiny models.

An SFT checkpoint and precompute parquet are published with the real schemas and manifests
(:func:`tests.helpers.training.make_run`; the other stages' jobs are not needed), then the real
entrypoint runs in subprocesses (torchrun for 2 ranks, gloo): metrics and lineage, 2 ranks
ZeRO-3 == 1 rank, kill and resume.
"""

from __future__ import annotations

import numpy as np
import pytest

from lopd.layout import stage_prefix
from lopd.manifest import read_manifest
from lopd.store import open_store
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
    run = SimpleNamespace(recipe=recipe, section=recipe.opd, store=open_store(uri), stage="opd")
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

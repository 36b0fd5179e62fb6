"""Training paths beyond the main tests: multi-row packing is exact, gradient checkpointing
changes nothing but memory, and a 2-rank run killed mid-way resumes to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lopd.train.packing import Seq, pack
from tests.conftest import REPO
from tests.test_train_opd import RUN, final_weights, read_metrics, run_job
from tests.test_train_sft import conversations, sft_recipe


def _seqs(vocab: int, lengths: list[int], seed: int = 0) -> list[Seq]:
    """Random sequences; targets from a random split point on; extras encode (sequence, target #)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        labels = np.zeros(n, bool)
        labels[int(rng.integers(1, n)):] = True
        extras = {"tag": (1000.0 * i + np.arange(labels.sum())).astype(np.float32)}
        out.append(Seq(rng.integers(3, vocab, n).astype(np.int64), labels, i, extras))
    return out


def _alone(model, s: Seq) -> torch.Tensor:
    from lopd.train.losses import model_logprobs

    ids = torch.from_numpy(s.tokens).unsqueeze(0)
    tgt = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
    sel = torch.from_numpy(np.r_[s.labels[1:], False]).unsqueeze(0)
    return model_logprobs(model, ids, torch.arange(ids.shape[1]).unsqueeze(0), tgt, sel)[0]


@pytest.mark.parametrize("sort", [True, False])
def test_multi_row_packing_equals_each_sequence_alone(tiny_model, sort):
    """Rows x width micro-batches (first-fit decreasing or in order, filler at row ends): the
    per-sequence log-probs equal each sequence run alone; extras and seq_index stay aligned."""
    from transformers import AutoModelForCausalLM

    from lopd.train.losses import model_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    lengths = [90, 12, 45, 7, 60, 33, 21, 70, 5, 40, 18, 26]
    seqs = _seqs(model.config.vocab_size, lengths)
    budget = 200
    mbs = pack(seqs, budget, sort=sort)
    multi = [mb for mb in mbs if mb.input_ids.shape[0] > 1]
    assert multi, [tuple(mb.input_ids.shape) for mb in mbs]
    # some row holds several sequences (positions restart inside it) and some row ends in filler
    restarts = [int((mb.position_ids[:, 1:] == 0).sum()) for mb in mbs]
    assert sum(restarts) > 0
    assert sum(mb.input_ids.numel() for mb in mbs) > sum(lengths)
    got: dict[int, list[torch.Tensor]] = {}
    order = []
    with torch.no_grad():
        for mb in mbs:
            assert mb.input_ids.numel() <= budget and mb.attention_mask is None
            lp, _ = model_logprobs(model, mb.input_ids, mb.position_ids, mb.targets, mb.select)
            # the same rows flattened into one (what the engine feeds FlashAttention) give the same
            flat, _ = model_logprobs(model, *(t.reshape(1, -1) for t in (mb.input_ids, mb.position_ids, mb.targets,
                                                                          mb.select)))
            torch.testing.assert_close(flat, lp, rtol=1e-5, atol=1e-5)
            for i in torch.unique_consecutive(mb.seq_index).tolist():
                got[i] = lp[mb.seq_index == i]
                order.append(i)
                np.testing.assert_array_equal(mb.extras["tag"][mb.seq_index == i].numpy(), seqs[i].extras["tag"])
        assert sorted(order) == list(range(len(seqs)))  # each sequence once, never split
        if not sort:
            assert order == list(range(len(seqs)))  # concatenated targets are in input order
        for s in seqs:
            torch.testing.assert_close(got[s.index], _alone(model, s), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- gradient checkpointing


def gc_child(model_dir: str) -> None:
    """3 SFT steps through DeepSpeed (1 rank, gloo) with gradient checkpointing off, then on;
    prints per-step loss / grad norm, decoder-layer forward calls and the final weights' gap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.recipe import SftConfig
    from lopd.train.data import encode_sft_row
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.sft import sft_step

    init_distributed()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [encode_sft_row(tok, c, 128, f"row {i}") for i, c in enumerate(conversations(8))]
    out, weights = {}, {}
    for gc in (False, True):
        cfg = SftConfig(optim={"lr": 3e-3, "weight_decay": 0.0},
                        train={"gradient_checkpointing": gc, "zero_stage": 0, "micro_batch_tokens": 160,
                               "global_batch": 8, "steps": 3})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine = build_engine(model, cfg.train, cfg.optim)
        calls = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        steps = [sft_step(engine, seqs, cfg, 3e-3, 1) for _ in range(3)]
        out[str(gc)] = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                        "forward_calls": calls[0], "checkpointing": model.is_gradient_checkpointing}
        weights[gc] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["max_weight_diff"] = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in weights[True])
    print(json.dumps(out))


def test_gradient_checkpointing_gives_the_same_steps(tiny_model):
    """Checkpointing recomputes each layer's forward in the backward (twice the layer calls);
    loss, gradient norm and the weights after 3 AdamW steps agree to 1e-6 relative (float32,
    recomputation repeats the same kernels; only the backward's accumulation order may differ)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_extra", "--gc-child", str(tiny_model)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    off, on = res["False"], res["True"]
    assert on["checkpointing"] and not off["checkpointing"]
    assert on["forward_calls"] == 2 * off["forward_calls"] > 0  # the backward really recomputed
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-6)
    assert off["loss"][-1] < off["loss"][0]  # the steps did train
    assert res["max_weight_diff"] < 1e-6


# --------------------------------------------------------------------------- 2-rank kill / resume


def test_two_ranks_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_model):
    """SFT on 2 ranks (torchrun, gloo, ZeRO-3, packed rows): SIGKILL after step 3 (checkpoint at 2),
    rerun: it resumes from step 2 and ends bit-identical to an uninterrupted 2-rank run."""
    train = {"steps": 4, "checkpoint_every": 2, "zero_stage": 3}
    base_recipe, base_uri = sft_recipe(tmp_path / "full", tiny_model, **train)
    run_job("jobs.sft", base_recipe, nproc=2)
    recipe, uri = sft_recipe(tmp_path / "killed", tiny_model, **train)
    killed = run_job("jobs.sft", recipe, nproc=2, env={"LOPD_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert killed.returncode != 0 and '"event": "fault-injection"' in killed.stderr, killed.stderr[-2000:]
    from lopd.lineage import stage_prefix
    from lopd.store import open_store

    assert not open_store(uri).exists(f"{stage_prefix(RUN, 'sft')}/MANIFEST.json")
    resumed = run_job("jobs.sft", recipe, nproc=2)
    assert '"event": "resume"' in resumed.stderr and '"step": 2' in resumed.stderr
    wa, wb = final_weights(base_uri, tmp_path / "full", "sft"), final_weights(uri, tmp_path / "killed", "sft")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0
    a, b = read_metrics(base_uri, "sft"), read_metrics(uri, "sft")
    assert [h["step"] for h in b] == [1, 2, 3, 4]
    assert [h["loss"] for h in a] == [h["loss"] for h in b]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gc-child"]:
        gc_child(sys.argv[2])

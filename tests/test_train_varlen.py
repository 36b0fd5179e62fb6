"""Flat varlen packing (lopd.train.packing.flat_pack + lopd.train.varlen): one row per
micro-batch without filler, host-side boundaries reaching the attention function through the
decoder layers (gradient checkpointing too), no mask built, and per-sequence log-probs and
gradients equal to each sequence run alone (float64, tight); one SFT step through DeepSpeed with
``train.attention: varlen`` equals the sdpa step."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lopd.train.packing import Seq, dummy_micro_batch, make_micro_batches, pack
from tests.helpers.cli import REPO

LENGTHS = [9, 2, 17, 5, 12, 3, 8, 14]


def _model(dtype=torch.float64, seed: int = 0):
    """A tiny random Qwen3 with GQA heads (4 query heads, 2 key/value heads), sdpa attention."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return Qwen3ForCausalLM(cfg).to(dtype)


def _seqs(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[Seq]:
    """Random sequences, targets from a random split point on (length 2: one target); extras tag
    (sequence, target #); a 2-D extra ``[targets, 2]``."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        labels = np.zeros(n, bool)
        labels[int(rng.integers(1, n)):] = True
        t = int(labels.sum())
        extras = {"tag": (1000.0 * i + np.arange(t)).astype(np.float32),
                  "ids": np.stack([np.arange(t), np.arange(t) + 1000 * i], 1).astype(np.int64)}
        out.append(Seq(rng.integers(1, vocab, n).astype(np.int64), labels, i, extras))
    return out


def test_flat_packing_is_one_row_without_filler_in_input_order():
    seqs = _seqs(50)
    budget = 30
    mbs = make_micro_batches(seqs, budget, flat=True)
    assert len(mbs) > 1 and sum(mb.num_seqs for mb in mbs) == len(seqs)
    assert sum(mb.input_ids.numel() for mb in mbs) == sum(LENGTHS)  # no filler
    first = 0
    for mb in mbs:
        lengths = LENGTHS[first:first + mb.num_seqs]
        first += mb.num_seqs
        assert mb.input_ids.shape == (1, sum(lengths)) and mb.attention_mask is None
        assert sum(lengths) <= budget or mb.num_seqs == 1
        assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens.tolist() == np.r_[0, np.cumsum(lengths)].tolist()
        assert mb.max_seqlen == max(lengths)
        assert mb.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
        moved = mb.to("cpu")
        assert moved.cu_seqlens.tolist() == mb.cu_seqlens.tolist() and moved.max_seqlen == mb.max_seqlen
    # the same targets, extras and order as in-order packed rows (and the input order)
    rows = pack(seqs, budget, sort=False)
    for key in ("tag", "ids"):
        a, b = (torch.cat([mb.extras[key] for mb in x]) for x in (mbs, rows))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cat = torch.cat([mb.seq_index for mb in mbs])
    assert cat.tolist() == torch.cat([mb.seq_index for mb in rows]).tolist() == sorted(cat.tolist())
    got = torch.cat([mb.targets.flatten()[mb.select_index] for mb in mbs])
    assert got.tolist() == [int(t) for s in seqs for t in s.tokens[s.labels]]
    # a sequence longer than the budget is a micro-batch of its own; non-flat layouts have no boundaries
    assert [mb.num_seqs for mb in make_micro_batches(_seqs(50, [40, 3, 4]), 30, flat=True)] == [1, 2]
    assert make_micro_batches(seqs, budget)[0].cu_seqlens is None and dummy_micro_batch().cu_seqlens is None


def _alone(model, s: Seq) -> torch.Tensor:
    from lopd.train.losses import model_logprobs

    ids = torch.from_numpy(s.tokens).unsqueeze(0)
    tgt = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
    sel = torch.from_numpy(np.r_[s.labels[1:], False]).unsqueeze(0)
    return model_logprobs(model, ids, torch.arange(ids.shape[1]).unsqueeze(0), tgt, sel, chunk_size=4)[0]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_logprobs_and_gradients_equal_each_sequence_alone(monkeypatch, checkpointing):
    """float64, GQA heads, lengths down to 2: a flat micro-batch through the varlen attention gives
    every sequence's log-probs and the parameters' gradients of a weighted sum of them exactly as
    the sequences run alone through sdpa; the boundaries reach every layer's attention (also in the
    recomputation of gradient checkpointing) and no mask is built."""
    import transformers.masking_utils as mu

    import lopd.train.varlen as V
    from lopd.train.losses import model_logprobs

    ref = _model()
    model = copy.deepcopy(ref)
    V.set_attention(model, "varlen")
    assert model.config._attn_implementation == V.NAME and ref.config._attn_implementation == "sdpa"
    if checkpointing:
        for m in (ref, model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
    seqs = _seqs(model.config.vocab_size)
    mbs = make_micro_batches(seqs, 40, flat=True)
    assert len(mbs) > 1 and any(mb.num_seqs > 2 for mb in mbs)
    weights = torch.from_numpy(np.random.default_rng(1).standard_normal(sum(s.num_targets for s in seqs)))

    calls: list[list[int]] = []
    loop = V._loop
    monkeypatch.setattr(V, "_loop", lambda q, k, v, bounds, scaling: (calls.append(bounds), loop(q, k, v, bounds,
                                                                                                   scaling))[1])

    def no_detection(*a, **k):
        raise AssertionError("packed-sequence detection ran")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", no_detection)
    lp = torch.cat([model_logprobs(model, mb.input_ids, mb.position_ids, mb.targets, mb.select_index,
                                   chunk_size=4, cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0] for mb in mbs])
    (lp * weights).sum().backward()
    layers = model.config.num_hidden_layers
    expected = [mb.cu_seqlens.tolist() for mb in mbs for _ in range(layers)]
    assert calls[:len(expected)] == expected
    assert len(calls) == len(expected) * (2 if checkpointing else 1)  # recomputed in the backward
    monkeypatch.undo()

    alone = torch.cat([_alone(ref, s) for s in seqs])
    (alone * weights).sum().backward()
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, alone, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_engine_forward_with_topk_on_flat_micro_batches_equals_sdpa_rows():
    """``forward_logprobs`` (LogprobModel, the top-k objective too) on flat micro-batches through the
    varlen attention equals first-fit-decreasing rows through sdpa, sequence by sequence."""
    import lopd.train.varlen as V
    from lopd.train.engine import LogprobModel, forward_logprobs
    from lopd.train.topk import topk_inputs

    ref = _model()
    model = copy.deepcopy(ref)
    V.set_attention(model, "varlen")
    seqs = _seqs(ref.config.vocab_size)
    for s in seqs:
        n = s.num_targets
        s.extras = {"teacher_logprobs": -np.linspace(1, 3, n), "teacher_topk_ids": s.extras["ids"] % 61,
                    "teacher_topk_logprobs": -np.tile([0.5, 2.0], (n, 1))}

    def per_seq(engine, mbs):
        out = {}
        with torch.no_grad():
            for mb in mbs:
                lp, ent = forward_logprobs(engine, mb, entropy=True)
                tk = forward_logprobs(engine, mb, topk=topk_inputs(mb))[0]
                for i in torch.unique(mb.seq_index).tolist():
                    out[i] = torch.stack([lp, ent, tk])[:, mb.seq_index == i]
        return out

    got = per_seq(LogprobModel(model, 4), make_micro_batches(seqs, 40, flat=True))
    want = per_seq(LogprobModel(ref, 4), make_micro_batches(seqs, 40))
    assert got.keys() == want.keys() == set(range(len(seqs)))
    for i in got:
        torch.testing.assert_close(got[i], want[i], rtol=1e-10, atol=1e-10)


def step_child() -> None:
    """One SFT step through DeepSpeed (1 rank, gloo, fp32, ZeRO-0, gradient checkpointing) per
    attention; prints the metrics and the updated weights' largest gap."""
    from lopd.recipe import SftConfig
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.sft import sft_step
    from lopd.train.varlen import set_attention

    init_distributed()
    out, weights = {}, {}
    for attention in ("sdpa", "varlen"):
        cfg = SftConfig(optim={"lr": 1e-3, "weight_decay": 0.0},
                        train={"zero_stage": 0, "gradient_checkpointing": True, "micro_batch_tokens": 40,
                               "global_batch": len(LENGTHS), "steps": 1, "attention": attention})
        model = _model(torch.float32)
        set_attention(model, cfg.train.attention)
        engine = build_engine(model, cfg.train, cfg.optim, chunk_size=4)
        seqs = _seqs(model.config.vocab_size)
        m = sft_step(engine, seqs, cfg, 1e-3, 1)
        out[attention] = {k: m[k] for k in ("loss", "grad_norm", "target_tokens", "pad_fraction")}
        weights[attention] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    a, b = weights["sdpa"], weights["varlen"]
    out["max_weight_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(json.dumps(out))


def test_sft_step_with_varlen_attention_equals_sdpa():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_varlen", "--step-child"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    sdpa, varlen = res["sdpa"], res["varlen"]
    for k in ("loss", "grad_norm", "target_tokens"):
        assert varlen[k] == pytest.approx(sdpa[k], rel=1e-6), k
    assert sdpa["grad_norm"] > 0 and varlen["pad_fraction"] == 0.0 < sdpa["pad_fraction"]
    assert res["max_weight_diff"] <= 1e-6


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step-child"]:
        step_child()

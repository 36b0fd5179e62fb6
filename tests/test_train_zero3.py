"""ZeRO-3 lock-step: ranks with different numbers of micro-batches and of LM-head chunks.

Under ZeRO-3 every module call all-gathers that module's parameters, so every rank must call
the same modules the same number of times in the same order, or the job hangs. Two places
could break that: the no-grad ``log p_old`` forwards (one per local micro-batch) and the
chunked LM head (one call per ``logprob_chunk_tokens`` selected positions, again in the
backward). ``lopd.train.step.plan_step`` equalises both across ranks (below ZeRO-3 only the
number of passes, which one SFT test checks at ZeRO-2); these tests run the real entrypoints
under torchrun (gloo) with a subprocess timeout, so a hang fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lopd.train.data import global_batch_indices, rank_share
from lopd.train.losses import chunk_count, chunked_logprobs
from lopd.train.opd import split_minis
from lopd.train.packing import Seq, make_micro_batches
from lopd.train.sft_rows import encode_sft_row
from tests.helpers.training import (
    RUN,
    logprobs_of,
    make_run,
    publish_sft_data,
    read_metrics,
    run_job,
    sample_responses,
)

# one PPO mini-batch per step: on-policy, the ratio is exactly 1, so no token sits at the clip
# boundary where rounding could flip it (see tests/test_train_opd.py's two-rank test)
N_ROWS, MICRO_TOKENS, CHUNK, STEPS, MINIS = 16, 24, 3, 2, 1
HANG_TIMEOUT_S = 240  # a hang fails the test instead of the suite


# --------------------------------------------------------------------------- unit: padding chunks


@pytest.mark.parametrize("n", [0, 1, 7, 9])
def test_padding_chunks_change_neither_values_nor_gradients(n):
    """``num_chunks`` beyond ``ceil(N / chunk)`` adds empty LM-head calls: same log-probs, entropies and
    gradients (bit for bit), and the head is called exactly ``max(num_chunks, ceil(N / chunk), 1)``
    times forward and again in the backward (the recomputation ZeRO-3 also gathers for)."""
    torch.manual_seed(n)
    head = torch.nn.Linear(16, 40, bias=False, dtype=torch.float64)
    hidden = torch.randn(n, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (n,))
    calls: list[str] = []
    head.register_forward_pre_hook(lambda m, i: calls.append("f"))

    def run(num_chunks):
        calls.clear()
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        lp, ent = chunked_logprobs(h, head, targets, chunk_size=3, num_chunks=num_chunks)
        ((lp * torch.linspace(-1, 2, n, dtype=torch.float64)).sum() + 0.3 * ent.sum()).backward()
        grads = (h.grad if h.grad is not None else torch.zeros_like(h), head.weight.grad.clone())
        return lp.detach(), ent.detach(), grads, calls.count("f")

    lp0, ent0, (gh0, gw0), _ = run(None)
    for k in (None, 0, chunk_count(n, 3), chunk_count(n, 3) + 2, 6):
        lp, ent, (gh, gw), f = run(k)
        assert torch.equal(lp, lp0) and torch.equal(ent, ent0)
        assert torch.equal(gh, gh0) and torch.equal(gw, gw0)
        if k is not None:
            assert f == 2 * max(k, chunk_count(n, 3), 1)  # forward + checkpoint recomputation
    with torch.no_grad():
        calls.clear()
        chunked_logprobs(hidden, head, targets, chunk_size=3, num_chunks=5)
        assert calls.count("f") == max(5, chunk_count(n, 3))


# --------------------------------------------------------------------------- 2 ranks, ZeRO-3


@pytest.fixture(scope="module")
def uneven_rows(opd_models):
    """Rollouts with a wide spread of response lengths (prefixes of sampled responses, so still
    the student's samples), scored by the teacher."""
    student, teacher = opd_models
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, rng.integers(3, 9)).tolist() for _ in range(N_ROWS)]
    full = sample_responses(student, prompts, seed=3, max_new=16)
    responses = [r[:int(rng.integers(1, len(r) + 1))] for r in full]
    return {"prompt_id": [f"p{i:03d}" for i in range(N_ROWS)], "sample_index": [0] * N_ROWS,
            "prompt_token_ids": prompts, "response_token_ids": responses,
            "teacher_logprobs": logprobs_of(teacher, prompts, responses),
            "rollout_logprobs": logprobs_of(student, prompts, responses),
            "finish_reason": ["length"] * N_ROWS, "answer": [None] * N_ROWS}


def rank_plans(rows: dict, world: int) -> list[list[tuple[int, tuple[int, ...]]]]:
    """For each step, per PPO mini-batch then rank: (micro-batches, LM-head chunks of each) as the job
    builds them (same functions, same order: samples sorted by prompt_id)."""
    seqs = []
    for p, r in zip(rows["prompt_token_ids"], rows["response_token_ids"], strict=True):
        labels = np.zeros(len(p) + len(r), bool)
        labels[len(p):] = True
        seqs.append(Seq(np.zeros(len(labels), np.int64), labels))
    out = []
    for step in range(STEPS):
        batch = [seqs[i] for i in global_batch_indices(N_ROWS, step, N_ROWS, 0)]
        per_rank = [split_minis(batch, MINIS, r, world) for r in range(world)]
        plan = []
        for j in range(MINIS):
            for r in range(world):
                mbs = make_micro_batches(per_rank[r][j], MICRO_TOKENS)
                plan.append((len(mbs), tuple(chunk_count(mb.num_targets, CHUNK) for mb in mbs)))
        out.append(plan)
    return out


def test_zero3_two_ranks_uneven_micro_batches_and_chunks_match_one_rank(tmp_path, opd_models,
                                                                        uneven_rows):
    """2 ranks ZeRO-3 whose ranks get different numbers of micro-batches and of LM-head chunks
    finish (no hang) with the loss curve of 1 rank ZeRO-0 on the same global batches."""
    plans = rank_plans(uneven_rows, 2)
    pairs = [(a, b) for step in plans for a, b in zip(step[0::2], step[1::2], strict=True)]
    mbs_differ = any(a[0] != b[0] for a, b in pairs)
    chunks_differ = any(x != y for a, b in pairs for x, y in zip(a[1], b[1], strict=False))  # same micro-batch index
    assert mbs_differ and chunks_differ, plans  # the premise: without lock-step, the ranks' module calls differ
    opd = {"logprob_chunk_tokens": CHUNK, "mini_batches": MINIS,
           "train": {"steps": STEPS, "global_batch": N_ROWS, "micro_batch_tokens": MICRO_TOKENS,
                     "checkpoint_every": 100}}
    one, one_uri = make_run(tmp_path / "one", opd_models, uneven_rows, **opd)
    two, two_uri = make_run(tmp_path / "two", opd_models, uneven_rows,
                            **{**opd, "train": {**opd["train"], "zero_stage": 3}})
    run_job("jobs.opd", one, timeout=HANG_TIMEOUT_S)
    run_job("jobs.opd", two, nproc=2, timeout=HANG_TIMEOUT_S)
    a, b = read_metrics(one_uri), read_metrics(two_uri)
    assert [h["step"] for h in b] == list(range(1, STEPS + 1))
    # step 1 starts from identical weights: only fp32 summation order differs (gloo, ZeRO-3 partitions);
    # step 2 starts from weights that differ by rounding, which Adam can amplify: rel 1e-4
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5, abs=1e-7)
    assert b[0]["reverse_kl_est"] == pytest.approx(a[0]["reverse_kl_est"], rel=1e-5)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["response_tokens"] == x["response_tokens"]


# --------------------------------------------------------------------------- SFT: same engine loop

SFT_STEPS = [120, 3, 90, 5, 110, 60]  # arithmetic steps per answer: ~10 tokens each, 21..1287 assistant tokens
SFT_BUDGET, SFT_CHUNK = 1400, 1024  # SFT has no chunk setting: the trainer's default 1024 applies


def long_conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": f"Sum the first {k}."},
             {"role": "assistant", "content": " ".join(f"{i}+{i + 1}={2 * i + 1};" for i in range(k))}]
            for k in SFT_STEPS]


def sft_run(tmp: Path, model: Path, zero_stage: int) -> tuple[Path, str]:
    store_uri = f"file://{tmp / 'store'}"
    convs = long_conversations()
    publish_sft_data(store_uri, tmp, convs=convs)
    train = {"steps": 2, "global_batch": len(convs), "micro_batch_tokens": SFT_BUDGET, "max_seq_len": SFT_BUDGET,
             "zero_stage": zero_stage, "gradient_checkpointing": False, "checkpoint_every": 100}
    recipe = {"run_id": RUN, "store": store_uri,
              "models": {"teacher": {"uri": str(model)}, "student": {"uri": str(model)}},
              "sft": {"optim": {"lr": 3e-3, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
                      "train": train}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml", store_uri


@pytest.mark.parametrize("zero_stage", [3, 2])
def test_two_ranks_sft_uneven_micro_batches_and_chunks_match_one_rank(tmp_path, tiny_model, zero_stage):
    """SFT shares the engine loop: ranks with different micro-batch and LM-head chunk counts
    (over 1024 assistant tokens in some micro-batches) finish and match 1 rank ZeRO-0; at ZeRO-3
    in lock step, at ZeRO-2 with each rank's own LM-head calls (the same number of passes)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    seqs = [encode_sft_row(tok, c, SFT_BUDGET, "r") for c in long_conversations()]
    per_step = []
    for step in range(2):
        batch = [seqs[i] for i in global_batch_indices(len(seqs), step, len(seqs), 0)]
        per_step.append([[chunk_count(mb.num_targets, SFT_CHUNK) for mb in
                          make_micro_batches(rank_share(batch, r, 2), SFT_BUDGET)] for r in range(2)])
    assert any(len(a) != len(b) for a, b in per_step), per_step
    assert any(x != y for a, b in per_step for x, y in zip(a, b, strict=False)), per_step
    one, one_uri = sft_run(tmp_path / "one", tiny_model, 0)
    two, two_uri = sft_run(tmp_path / "two", tiny_model, zero_stage)
    run_job("jobs.sft", one, timeout=HANG_TIMEOUT_S)
    run_job("jobs.sft", two, nproc=2, timeout=HANG_TIMEOUT_S)
    a, b = read_metrics(one_uri, "sft"), read_metrics(two_uri, "sft")
    assert len(b) == 2
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)  # same weights: summation order only
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-3)  # after one Adam step
    assert b[1]["target_tokens"] == a[1]["target_tokens"]

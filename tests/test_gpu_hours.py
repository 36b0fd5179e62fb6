"""``lopd recipe estimate`` (:mod:`lopd.gpu_hours`) and the FLOPs model it shares with the GPU
benchmarks (:mod:`lopd.flops`): pure arithmetic, checked by hand."""

from __future__ import annotations

import json

import pytest

from lopd import LopdError
from lopd.flops import PEAK_BF16, SHAPES, flops_per_token, matmul_params, shape_of
from lopd.gpu_hours import Rates, estimate
from lopd.recipe import load_recipe
from tests.helpers.cli import REPO, lopd_cli

QWEN3_8B = REPO / "jobs" / "recipes" / "qwen3-8b.yaml"


def test_matmul_params_of_the_stock_shapes():
    assert matmul_params(SHAPES["qwen3-1.7b"]) == 1_720_451_072  # docs/gpu.md: 1.72 B, LM head included
    assert round(matmul_params(SHAPES["qwen3-8b"]) / 1e9, 2) == 7.57
    assert round(matmul_params(SHAPES["qwen3-32b"]) / 1e9, 2) == 31.98
    assert round(matmul_params(SHAPES["qwen3-30b-a3b"]) / 1e9, 2) == 3.04  # 8 of 128 experts active
    s = SHAPES["qwen3-8b"]
    attn = 36 * 32 * 128 * 1000.0
    assert flops_per_token(s, 1000.0) == 6 * matmul_params(s) + 12 * attn
    assert flops_per_token(s, 1000.0, "forward") == 2 * matmul_params(s) + 4 * attn


def test_shapes_by_hub_name_or_local_config(tmp_path):
    assert shape_of("Qwen/Qwen3-8B-Base") is SHAPES["qwen3-8b"] and shape_of("Qwen/Qwen3-32B") is SHAPES["qwen3-32b"]
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["tiny"]))
    assert matmul_params(shape_of(str(tmp_path))) == matmul_params(SHAPES["tiny"])
    with pytest.raises(LopdError, match="not a known shape") as e:
        shape_of("org/Mystery-7B")
    assert "\n" not in str(e.value)


def test_estimate_counts_each_methods_tokens_and_prices_them():
    r = load_recipe(QWEN3_8B)
    rates = Rates(train_mfu=0.2, score_mfu=0.4, decode_tok_s=4000.0)
    est = estimate(r, response_tokens=3000, prompt_tokens=200, opd_prompts=10_000, rates=rates)
    seq, trained = 3200, r.opd.train.steps * r.opd.train.global_batch
    light = est["lightning"]
    assert light["sampled_tokens"] == 10_000 * 3000 and light["scored_tokens"] == 10_000 * seq
    assert light["trained_tokens"] == trained * seq
    student, teacher = SHAPES["qwen3-8b"], SHAPES["qwen3-32b"]
    assert light["gpu_h_train"] == pytest.approx(trained * seq * flops_per_token(student, 1600) / (0.2 * PEAK_BF16)
                                                 / 3600)
    assert light["gpu_h_score"] == pytest.approx(10_000 * seq * flops_per_token(teacher, 1600, "forward")
                                                 / (0.4 * PEAK_BF16) / 3600)
    assert light["gpu_h_sample"] == pytest.approx(30e6 / (4000 * 8e9 / matmul_params(student)) / 3600)
    assert light["gpu_h"] == pytest.approx(light["gpu_h_sample"] + light["gpu_h_score"] + light["gpu_h_train"])
    online = est["online"]  # samples and scores every sequence it trains on
    assert online["sampled_tokens"] == trained * 3000 and online["scored_tokens"] == online["trained_tokens"]
    seqkd = est["seqkd"]  # the 32B teacher writes the answers: decoding 4x the weights is 4x slower
    assert seqkd["scored_tokens"] == 0 and seqkd["gpu_h_sample"] == pytest.approx(
        light["gpu_h_sample"] * matmul_params(teacher) / matmul_params(student))
    assert est["sft-continued"]["gpu_h"] == light["gpu_h_train"]


def test_cli_table_and_one_line_errors():
    ok = lopd_cli("recipe", "estimate", "-r", str(QWEN3_8B), "--opd-prompts", "17000", "--response-tokens", "3000")
    assert "| lightning |" in ok.stdout and "| online |" in ok.stdout and "1.00×" in ok.stdout
    bad = lopd_cli("recipe", "estimate", "-r", str(QWEN3_8B), check=False)  # the prompts live in S3
    assert bad.returncode != 0 and "give --opd-prompts" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

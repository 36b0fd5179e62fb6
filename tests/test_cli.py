"""The lopd CLI: command list, init-model output that transformers loads and generates with."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers.cli import REPO, lopd_cli

DESIGN_COMMANDS = ["run", "pipeline", "render", "deploy", "status", "logs", "report", "init-model"]


def test_help_lists_design_commands():
    out = lopd_cli("--help").stdout
    for cmd in DESIGN_COMMANDS + ["recipe", "store", "prompts"]:
        assert f"  {cmd} " in out, cmd


def test_store_ls(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "x.json").write_text("{}")
    out = lopd_cli("store", "ls", str(tmp_path), "-l").stdout
    assert "runs/r/x.json" in out and "2" in out
    empty = lopd_cli("store", "ls", str(tmp_path / "none"))
    assert empty.stdout == "" and "nothing under" in empty.stderr


def test_run_unknown_stage_and_bad_recipe(tmp_path):
    bad = lopd_cli("run", "nope", "-r", str(REPO / "jobs/recipes/tiny.yaml"), check=False)
    assert bad.returncode == 2 and "'nope' is not one of 'sft-data'" in bad.stderr
    missing = lopd_cli("run", "sft", "-r", str(tmp_path / "missing.yaml"), check=False)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: recipe error: file not found")


def test_init_model_loads_and_generates(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen3" and model.config.head_dim == 32
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 64 == 0
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 1+2+3."}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nCompute 1+2+3.<|im_end|>\n<|im_start|>assistant\n"
    no_think = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                       tokenize=False, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    enc = tok(text, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    masked = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "42"}],
                                     return_assistant_tokens_mask=True, return_dict=True)
    kept = [t for t, m in zip(masked["input_ids"], masked["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == "42<|im_end|>"


def test_init_model_moe_shares_tokenizer(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "moe"
    res = lopd_cli("init-model", "--out", str(out), "--arch", "qwen3-moe", "--tokenizer", str(tiny_model),
                   "--experts", "4", "--experts-per-token", "2")
    assert "qwen3-moe/tiny" in res.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    enc = AutoTokenizer.from_pretrained(out)("1+2=", return_tensors="pt")
    assert model.generate(**enc, max_new_tokens=4, do_sample=False).shape[1] > enc["input_ids"].shape[1]
    manifest = json.loads((out / "MANIFEST.json").read_text())
    fp = lopd_cli("fingerprint", str(out)).stdout.strip()
    assert manifest["lineage"]["fingerprint"] == fp


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "/nonexistent.txt"], "corpus file not found or empty"),
        ([], "give exactly one of --corpus"),
        (["--corpus", "CORPUS", "--vocab-size", "10"], "--vocab-size must be >="),
    ],
)
def test_init_model_errors(args, message, tmp_path, corpus):
    args = [str(corpus) if a == "CORPUS" else a for a in args]
    res = lopd_cli("init-model", "--out", str(tmp_path / "m"), *args, check=False)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_init_model_refuses_non_empty_dir(tmp_path, corpus):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("1")
    res = lopd_cli("init-model", "--out", str(tmp_path / "m"), "--corpus", str(corpus), check=False)
    assert res.returncode == 2 and "output directory is not empty" in res.stderr


def test_verify_names_each_file_that_differs_from_the_manifest(tiny_model, tmp_path):
    import shutil

    from tests.helpers.models import overwrite_in_place

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    assert lopd_cli("verify", str(model)).stdout.startswith("ok: ")
    overwrite_in_place(model / "model.safetensors")
    overwrite_in_place(model / "tokenizer.json", offset=8)
    res = lopd_cli("verify", f"file://{model}", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert [line.split(" (digest ")[0] for line in lines] == [
        "mismatch: model.safetensors: content differs from the manifest",
        "mismatch: tokenizer.json: content differs from the manifest"]
    pair = r"\(digest blake3:[0-9a-f]{64}, the manifest's blake3:[0-9a-f]{64}\)$"
    assert all(re.search(pair, line) for line in lines)
    assert res.stderr.strip() == f"error: verify: 2 file(s) of {model} differ from its MANIFEST.json"
    (model / "MANIFEST.json").unlink()
    missing = lopd_cli("verify", str(model), check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no manifest at")

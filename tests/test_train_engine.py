"""The DeepSpeed engine (lopd.train.engine): checkpointing (full or selective) and compiled layers
change nothing but memory and speed (and no step synchronises the device); in bf16 a step's
gradients add up in fp32 at ZeRO 1-3;
AdamW's parameter groups keep norm weights and biases out of weight decay unless the recipe says so.

The steps run in a child process (this module run as a script: ``--gc-child``), as DeepSpeed
initialises a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.cli import REPO
from tests.helpers.training import conversations

VARIANTS = {"off": {"gradient_checkpointing": False}, "full": {"gradient_checkpointing": True},
            "selective": {"gradient_checkpointing": "selective"},
            "compiled": {"gradient_checkpointing": True, "compile": "aot_eager"}}
"""How the decoder layers run (``lopd.train.layers``): each must give the same steps."""


def gc_child(model_dir: str) -> None:
    """3 SFT steps through DeepSpeed (1 rank, gloo) per :data:`VARIANTS`; prints per-step loss /
    grad norm, decoder-layer forward calls and each variant's final weights' gap to "off"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.recipe import SftConfig
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.sft import sft_step
    from lopd.train.sft_rows import encode_sft_row

    init_distributed()
    from deepspeed.accelerator import get_accelerator

    syncs, accel = [0], get_accelerator()
    sync = accel.synchronize
    accel.synchronize = lambda *a, **k: (syncs.__setitem__(0, syncs[0] + 1), sync(*a, **k))[1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [encode_sft_row(tok, c, 128, f"row {i}") for i, c in enumerate(conversations(8))]
    out, weights = {}, {}
    for name, layers in VARIANTS.items():
        cfg = SftConfig(optim={"lr": 3e-3, "weight_decay": 0.0},
                        train={**layers, "zero_stage": 0, "micro_batch_tokens": 160, "global_batch": 8, "steps": 3})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        engine = build_engine(model, cfg.train, cfg.optim)
        calls = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        steps = [sft_step(engine, seqs, cfg, 3e-3, 1) for _ in range(3)]
        out[name] = {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                     "forward_calls": calls[0], "checkpointing": model.is_gradient_checkpointing}
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[name]["max_weight_diff"] = max(float((weights[name][k] - weights["off"][k]).abs().max())
                                           for k in weights["off"])
    out["device_syncs"] = syncs[0]
    print(json.dumps(out))


def test_layer_settings_give_the_same_steps(tiny_model):
    """Full and selective checkpointing rerun each layer's forward in the backward (twice the
    layer calls: selective reruns the layer's code but takes its matmuls and attention from the
    forward); compiled layers (aot_eager) run the same kernels, the hook traced into their graph.
    Loss, gradient norm and the weights
    after 3 AdamW steps agree with plain autograd to 1e-6 relative (float32; only the backward's
    accumulation order may differ)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_engine", "--gc-child", str(tiny_model)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    off = res["off"]
    assert not off["checkpointing"] and off["forward_calls"] > 0
    assert off["loss"][-1] < off["loss"][0]  # the steps did train
    for name in ("full", "selective", "compiled"):
        on = res[name]
        assert on["checkpointing"], name
        if name != "compiled":  # in a compiled layer the hook was traced, not called per forward
            assert on["forward_calls"] == 2 * off["forward_calls"], name  # the backward really reran the layer
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-6), name
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-6), name
        assert on["max_weight_diff"] < 1e-6, name
    assert res["device_syncs"] == 0  # DeepSpeed's throughput timer (it syncs from step 3 on) is off


def accum_child(model_dir: str) -> None:
    """bf16 weights on CPU (1 rank, gloo): the gradient DeepSpeed holds after 3 micro-batches, per
    ZeRO stage 1-3 with ``grad_accum_fp32`` on and off, against the per-micro-batch bf16 gradients
    of a plain copy summed in fp32, that sum rounded once to bf16, and their bf16 sum. Prints the
    largest gap to each."""
    import numpy as np
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from lopd.recipe import SftConfig
    from lopd.train.engine import build_engine, ds_config, forward_logprobs, init_distributed
    from lopd.train.losses import model_logprobs
    from lopd.train.packing import Seq, make_micro_batches

    init_distributed()
    rng = np.random.default_rng(0)
    mbs = make_micro_batches([Seq(rng.integers(0, 200, 48), np.r_[False, np.ones(47, bool)], i) for i in range(6)],
                             100)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    sums = {"fp32": [torch.zeros_like(p, dtype=torch.float32) for p in ref.parameters()],
            "bf16": [torch.zeros_like(p) for p in ref.parameters()]}
    for mb in mbs:
        ref.zero_grad()
        lp, _ = model_logprobs(ref, mb.input_ids, mb.position_ids, mb.targets, mb.select_index, mb.attention_mask)
        (-lp.float().sum() / 100).backward()
        for s32, s16, p in zip(sums["fp32"], sums["bf16"], ref.parameters(), strict=True):
            s32 += p.grad.float()
            s16 += p.grad
    sums["fp32 rounded"] = [s.bfloat16() for s in sums["fp32"]]
    out = {"micro_batches": len(mbs)}
    for stage, fp32, overlap in [(s, f, None) for s in (1, 2, 3) for f in (True, False)] + [(2, True, True)]:
        cfg = SftConfig(optim={"lr": 1e-5}, train={"zero_stage": stage, "gradient_checkpointing": False,
                                                   "grad_accum_fp32": fp32, "overlap_comm": overlap})
        engine = build_engine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), cfg.train,
                              cfg.optim)
        for i, mb in enumerate(mbs):
            engine.set_gradient_accumulation_boundary(i == len(mbs) - 1)
            lp, _ = forward_logprobs(engine, mb)
            engine.backward(-lp.float().sum() / 100, scale_wrt_gas=False)
        grads = [safe_get_full_grad(p).float() for p in engine.module.lm.parameters()]
        config = ds_config(cfg.train, cfg.optim, bf16=True)
        out[f"{stage} {fp32}" + (" overlap" if overlap else "")] = {
            "config": config.get("data_types"), "overlap_comm": config["zero_optimization"].get("overlap_comm"),
            "optimizer": type(engine.optimizer).__name__,
            **{k: max(float((g - r.float()).abs().max()) for g, r in zip(grads, v, strict=True))
               for k, v in sums.items()}}
    print(json.dumps(out))


def test_bf16_gradients_add_up_in_fp32(tiny_model):
    """bf16 weights, 3 micro-batches. With ``grad_accum_fp32`` (the default) at ZeRO-2 and ZeRO-3
    the accumulated gradient is exactly the fp32 sum of the micro-batches' bf16 gradients; at
    ZeRO-1 (DeepSpeed's BF16 optimizer) that sum rounded once to bf16 for the reduction. Off, every
    stage adds up in bf16: exactly the bf16 sum, a rounding per micro-batch. ``overlap_comm`` at
    ZeRO-2 changes none of it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_engine", "--accum-child", str(tiny_model)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop("micro_batches") == 3
    for stage in (1, 2, 3):
        on, off = res[f"{stage} True"], res[f"{stage} False"]
        assert on["config"] == {"grad_accum_dtype": "fp32"} and off["config"] is None
        assert on["fp32" if stage > 1 else "fp32 rounded"] == 0.0, (stage, on)
        assert on["bf16"] > 0.0 and off["bf16"] == 0.0 and off["fp32"] > 0.0, (stage, on, off)
    assert res["1 True"]["optimizer"] == "BF16_Optimizer"
    overlap = res.pop("2 True overlap")  # DeepSpeed's overlap_comm: the same sums
    assert overlap.pop("overlap_comm") is True and res["2 True"].pop("overlap_comm") is None
    assert overlap == res["2 True"]


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups_keep_norms_and_biases_out_of_weight_decay(tiny_model, tied):
    """A Qwen3 with attention biases: every norm weight (input/post-attention layernorms, q_norm,
    k_norm, the final norm) and every bias is in the group without decay; embeddings, the LM head
    and the linear weights are decayed; each parameter once (tied embeddings too). With
    ``decay_norms_and_biases`` one group decays them all."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lopd.recipe import OptimConfig
    from lopd.train.engine import param_groups

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.attention_bias, cfg.tie_word_embeddings = True, tied
    model = AutoModelForCausalLM.from_config(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, keep = param_groups(model, OptimConfig(weight_decay=0.1))
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    decayed, kept = [names[id(p)] for p in decay["params"]], [names[id(p)] for p in keep["params"]]
    assert sorted(decayed + kept) == sorted(names.values())  # each parameter exactly once
    assert set(kept) == {n for n in names.values() if n.endswith(("norm.weight", ".bias"))}
    for part in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight", "self_attn.q_proj.bias", "self_attn.o_proj.bias"):
        assert any(n.endswith(part) for n in kept), part
    assert "model.norm.weight" in kept and "model.embed_tokens.weight" in decayed
    assert ("lm_head.weight" in decayed) is not tied  # tied: the embedding's one tensor
    for part in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"):
        assert any(n.endswith(part) for n in decayed), part
    (everything,) = param_groups(model, OptimConfig(weight_decay=0.1, decay_norms_and_biases=True))
    assert everything["weight_decay"] == 0.1
    assert sorted(names[id(p)] for p in everything["params"]) == sorted(names.values())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gc-child"]:
        gc_child(sys.argv[2])
    elif sys.argv[1:2] == ["--accum-child"]:
        accum_child(sys.argv[2])

"""The DeepSpeed engine (lopd.train.engine): gradient checkpointing changes nothing but memory
(and no step synchronises the device);
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


def gc_child(model_dir: str) -> None:
    """3 SFT steps through DeepSpeed (1 rank, gloo) with gradient checkpointing off, then on;
    prints per-step loss / grad norm, decoder-layer forward calls and the final weights' gap."""
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
    out["device_syncs"] = syncs[0]
    print(json.dumps(out))


def test_gradient_checkpointing_gives_the_same_steps(tiny_model):
    """Checkpointing recomputes each layer's forward in the backward (twice the layer calls);
    loss, gradient norm and the weights after 3 AdamW steps agree to 1e-6 relative (float32,
    recomputation repeats the same kernels; only the backward's accumulation order may differ)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_engine", "--gc-child", str(tiny_model)],
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
    assert res["device_syncs"] == 0  # DeepSpeed's throughput timer (it syncs from step 3 on) is off


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

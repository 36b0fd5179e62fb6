"""How decoder layers run in training (lopd.train.layers): full and selective activation
checkpointing and torch.compile give the gradients of plain autograd, in float64, and selective
checkpointing's backward reruns no matmul and no attention."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lopd.train.layers import compile_backend, decoder_layers, is_attention, prepare_layers


class OpCount(TorchDispatchMode):
    """Counts the operators dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] = self.ops.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))

    def count(self, pred) -> int:
        return sum(n for name, n in self.ops.items() if pred(name))


def qwen3(attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(cfg).double()
    if attn == "varlen":
        from lopd.train.varlen import set_attention

        set_attention(model, "varlen")
    return model.train()


def loss_and_grads(model, lengths=(40,), census: bool = True) -> tuple[list[float], torch.Tensor, OpCount]:
    """Loss per batch and the gradient summed over batches of the given lengths (2 rows each); the
    operators of the last backward (``census``: a dispatch mode during the backward, which compiled
    code does not run under)."""
    losses = []
    model.zero_grad()
    for n in lengths:
        ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n))
        loss = model(input_ids=ids, labels=ids).loss
        ops = OpCount()
        with ops if census else contextlib.nullcontext():
            loss.backward()
        losses.append(loss.item())
    return losses, torch.cat([p.grad.flatten() for p in model.parameters()]), ops


def is_matmul(name: str) -> bool:
    return name.split("::")[-1].split(".")[0] in ("mm", "addmm", "bmm")


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_checkpointing_full_and_selective_equal_plain_autograd(attn):
    """float64: the loss and every gradient are bit-equal with checkpointing off, full and
    selective. Full reruns the layers' matmuls and attention in the backward; selective reruns
    neither (its backward dispatches exactly the matmuls of the plain one)."""
    runs = {}
    for mode in (False, True, "selective"):
        model = qwen3(attn)
        prepare_layers(model, checkpointing=mode)
        runs[mode] = loss_and_grads(model)
    (loss, grad, plain) = runs[False]
    for mode in (True, "selective"):
        assert runs[mode][0] == loss
        assert torch.equal(runs[mode][1], grad), mode
    full, selective = runs[True][2], runs["selective"][2]
    assert full.count(is_matmul) > plain.count(is_matmul) > 0  # full reran the projections
    assert selective.count(is_matmul) == plain.count(is_matmul)
    forward_attention = lambda n: is_attention(n) and "backward" not in n  # noqa: E731
    assert full.count(forward_attention) > 0 == selective.count(forward_attention) == plain.count(forward_attention)


def test_compile_aot_eager_equals_eager_across_lengths():
    """float64, full checkpointing: each decoder layer compiled (aot_eager: traced by dynamo and
    AOT autograd, run by the eager kernels) gives the eager losses and gradients bit for bit, over
    micro-batches of three lengths (a recompile, then dynamic lengths); parameter names unchanged."""
    eager, compiled = qwen3(), qwen3()
    names = [n for n, _ in eager.named_parameters()]
    prepare_layers(eager, checkpointing=True)
    prepare_layers(compiled, checkpointing=True, compile="aot_eager")
    assert [n for n, _ in compiled.named_parameters()] == names
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled))
    a, b = (loss_and_grads(m, (40, 57, 33), census=False) for m in (eager, compiled))
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1])


def test_layer_helpers():
    """The decoder layers of a Qwen3 are its ``model.layers``; compile values map to backends;
    attention kernels are recognised by name on CPU, CUDA and FlashAttention-2."""
    model = qwen3()
    assert decoder_layers(model) == list(model.model.layers)
    assert [compile_backend(v) for v in (False, True, "inductor", "aot_eager")] == [None, "inductor", "inductor",
                                                                                      "aot_eager"]
    for name in ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_flash_attention_forward",
                 "torch_attn::_varlen_attn", "flash_attn::_flash_attn_varlen_forward",
                 "aten::_scaled_dot_product_efficient_attention"):
        assert is_attention(name), name
    assert not any(is_attention(n) for n in ("aten::mm", "aten::mul.Tensor", "aten::rsqrt"))
    with pytest.raises(ValueError, match="train.compile: Linear has no decoder layers"):
        prepare_layers(torch.nn.Linear(2, 2), checkpointing=False, compile=True)

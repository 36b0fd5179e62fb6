"""How the decoder layers run in training: activation checkpointing (full or selective) and
``torch.compile``, from ``train.gradient_checkpointing`` and ``train.compile``.

- **Full checkpointing** (``true``): each decoder layer keeps only its input; the backward reruns
  its whole forward (matmuls and attention included) before differentiating it. Transformers'
  own per-layer checkpointing, non-reentrant.
- **Selective** (``"selective"``): the same per-layer checkpoint with PyTorch's selective
  activation checkpointing (:func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`):
  the forward also keeps the outputs of the matmuls and of attention (:func:`keep_matmuls_and_attention`),
  so the rerun in the backward recomputes only the cheap operations between them (RMSNorm, RoPE,
  SiLU and the gating product, the residual adds). That saves the rerun of every projection and
  of attention, a quarter of a checkpointed step's matmul FLOPs (6 instead of 8 times the
  parameters per token), for the memory of the kept outputs: about ``4·d + 2·d_kv + 2·d_ff``
  values per token and layer (Qwen3-1.7B in bf16: 44 KiB, 19 GiB for a 16k-token micro-batch).
- **Compile** (``true`` / ``"inductor"`` / ``"aot_eager"``): ``nn.Module.compile`` on each
  decoder layer (in place: parameter names and checkpoints are unchanged). Layers of one model
  share one graph; a micro-batch of a new length recompiles once, after which lengths are dynamic.

Every setting computes the same values as plain autograd: a rerun repeats the same kernels on the
same inputs (float64: gradients equal bit for bit, ``tests/test_train_layers.py``); inductor's
fused kernels may round differently.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

KEPT_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                      torch.ops.aten.baddbmm.default})
"""Matmul operators whose outputs selective checkpointing keeps (a ``Linear`` reaches the
dispatcher as ``mm`` / ``addmm``)."""


def is_attention(func) -> bool:
    """Whether a dispatched operator is an attention kernel: every one has "attention" or "attn" in
    its name (``aten._scaled_dot_product_flash_attention``, ``..._efficient_attention``,
    ``aten._flash_attention_forward``, PyTorch's ``torch_attn::_varlen_attn``, FlashAttention-2's
    ``flash_attn::_flash_attn_varlen_forward``, the CPU ``..._flash_attention_for_cpu``)."""
    name = func.name() if hasattr(func, "name") else str(func)
    return "attention" in name or "attn" in name


def keep_matmuls_and_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: keep (never rerun) matmul and attention outputs, rerun the rest."""
    if func in KEPT_OPS or is_attention(func):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules transformers checkpoints one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_kwargs(mode: bool | str) -> dict | None:
    """The ``gradient_checkpointing_kwargs`` of a ``train.gradient_checkpointing`` value; None = off."""
    if not mode:
        return None
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_matmuls_and_attention)
    return kwargs


def compile_backend(mode: bool | str) -> str | None:
    """The ``torch.compile`` backend of a ``train.compile`` value; None = off."""
    if not mode:
        return None
    return "inductor" if mode is True else str(mode)


def prepare_layers(model: torch.nn.Module, checkpointing: bool | str = True, compile: bool | str = False) -> None:
    """Set up ``model``'s decoder layers for training, in place: checkpointing per
    :func:`checkpoint_kwargs`, then each layer compiled with :func:`compile_backend`'s backend."""
    kwargs = checkpoint_kwargs(checkpointing)
    if kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    backend = compile_backend(compile)
    if backend is not None:
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"train.compile: {type(model).__name__} has no decoder layers to compile")
        for layer in layers:
            layer.compile(backend=backend)

"""Varlen attention for flat micro-batches: one row, attention within each sequence, no mask.

A flat micro-batch (:func:`lopd.train.packing.flat_pack`) is one row ``[1, T]`` of sequences
back to back, with its boundaries computed on the host (``cu_seqlens`` int32 ``[S+1]``,
``max_seqlen``). They reach the attention function as transformers' FlashAttention kwargs
(``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k``, see
:func:`varlen_kwargs`), which every decoder layer forwards untouched (gradient checkpointing
included).

:func:`register` adds the attention implementation ``"lopd_varlen"`` to transformers'
``AttentionInterface`` and, on purpose, nothing to ``AttentionMaskInterface``: for an
implementation without a mask function transformers builds no mask at all (no packed-sequence
detection from ``position_ids``, which reads the device, and no dense ``[T, T]`` mask).
The function computes causal attention per sequence:

- CUDA, bf16/fp16: FlashAttention-2's ``flash_attn_varlen_func`` when ``flash_attn`` is importable,
  else PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (both take ``[T, H, D]`` and GQA heads);
- otherwise (CPU, fp32/fp64): an exact loop of ``F.scaled_dot_product_attention(is_causal=True)``
  over the sequences (the boundaries read with ``tolist()``: free on the host).

Without boundaries (a micro-batch of one sequence per row, e.g. the dummy micro-batch, or
right-padded rows) every row is one causal sequence. :func:`set_attention` switches a loaded
model between ``"sdpa"`` and ``"varlen"``.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F

NAME = "lopd_varlen"
"""The attention implementation's name in transformers' ``AttentionInterface``."""


def varlen_kwargs(cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> dict:
    """The kwargs that carry a flat micro-batch's boundaries to the attention function through
    ``model.model(...)``: ``cu_seq_lens_q/k`` (int32 ``[S+1]``) and ``max_length_q/k`` (int);
    empty when ``cu_seqlens`` is None."""
    if cu_seqlens is None:
        return {}
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
            "max_length_q": int(max_seqlen), "max_length_k": int(max_seqlen)}


@cache
def _kernel():
    """(name, function) of the CUDA varlen kernel: FlashAttention-2 when importable, else PyTorch's
    ``varlen_attn``, else (None, None)."""
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func
    except (ImportError, OSError):  # not installed, or built against another torch / CUDA
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return "torch", varlen_attn
    except ImportError:
        return None, None


def cuda_kernel() -> str | None:
    """Which CUDA varlen kernel :data:`NAME` uses: "flash_attn", "torch", or None (neither)."""
    return _kernel()[0]


def _cuda_varlen(q, k, v, cu, max_len: int, scaling: float | None) -> torch.Tensor:
    """Causal varlen attention of ``q [T, Hq, D]``, ``k / v [T, Hkv, D]`` -> ``[T, Hq, D]``."""
    name, fn = _kernel()
    cu = cu.to(q.device, torch.int32, non_blocking=True)
    if name == "flash_attn":
        return fn(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scaling, causal=True)
    params = inspect.signature(fn).parameters
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    return fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra)


def _loop(query, key, value, bounds: list[int], scaling: float | None) -> torch.Tensor:
    """Exact causal attention per sequence: ``query [1, Hq, T, D]``, ``key / value [1, Hkv, T, D]``,
    sequence ``s`` at ``bounds[s]:bounds[s+1]`` -> ``[1, Hq, T, D]``."""
    gqa = query.shape[1] != key.shape[1]
    outs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query [B, Hq, T, D]``, ``key / value
    [B, Hkv, T, D]`` -> (``[B, T, Hq, D]``, None). With ``cu_seq_lens_q`` (int32 ``[S+1]``) and
    ``max_length_q`` in ``kwargs``, ``B`` is 1 and each sequence attends causally to itself only;
    without them each row is one causal sequence. ``attention_mask`` is always None (no mask
    function is registered); dropout and sliding windows are refused."""
    if dropout:
        raise ValueError(f"{NAME}: attention dropout is not supported (got {dropout})")
    if sliding_window is not None:
        raise ValueError(f"{NAME}: sliding-window attention is not supported")
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: sequence boundaries need one row, got {query.shape[0]}")
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _kernel()[0] is not None:
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, H, D]
        return _cuda_varlen(q, k, v, cu, int(max_len), scaling).unsqueeze(0), None
    bounds = [int(b) for b in cu.tolist()]  # a host tensor: no sync (only fp32 on CUDA reads the device)
    return _loop(query, key, value, bounds, scaling).transpose(1, 2).contiguous(), None


def register() -> None:
    """Add ``"lopd_varlen"`` to transformers' ``AttentionInterface`` (idempotent); no mask function."""
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(NAME) is not varlen_attention_forward:
        AttentionInterface.register(NAME, varlen_attention_forward)


def set_attention(model, name: str) -> None:
    """Switch a loaded transformers model's attention: ``"sdpa"`` (transformers' sdpa, packed rows
    detected from ``position_ids``) or ``"varlen"`` (:func:`varlen_attention_forward`, for flat
    micro-batches)."""
    if name not in ("sdpa", "varlen"):
        raise ValueError(f"unknown attention {name!r} (sdpa | varlen)")
    if name == "varlen":
        register()
    model.set_attn_implementation(NAME if name == "varlen" else "sdpa")

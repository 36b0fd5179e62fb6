"""Model FLOPs per token of the Qwen3 shapes lopd's recipes use (the GPU benchmarks' MFU and
``lopd recipe estimate``'s GPU-hours).

Shapes are the ``config.json`` values of the public checkpoints (no download); a local model
directory's own ``config.json`` works too. Counted: every matmul a token goes through (each
layer's projections, the active experts of a MoE layer and its router, the LM head) plus the
attention score and value products; not counted: recomputation (gradient checkpointing, the
chunked LM head), norms, activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lopd import LopdError

PEAK_BF16 = 989e12
"""Dense bf16 peak of one H100 SXM, FLOP/s (the MFU denominator)."""

_DENSE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "intermediate_size", "vocab_size")
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(zip(_DENSE, (64, 2, 2, 1, 32, 128, 512), strict=True), tie_word_embeddings=True),
    "qwen3-0.6b": dict(zip(_DENSE, (1024, 28, 16, 8, 128, 3072, 151936), strict=True), tie_word_embeddings=True),
    "qwen3-1.7b": dict(zip(_DENSE, (2048, 28, 16, 8, 128, 6144, 151936), strict=True), tie_word_embeddings=True),
    "qwen3-4b": dict(zip(_DENSE, (2560, 36, 32, 8, 128, 9728, 151936), strict=True), tie_word_embeddings=True),
    "qwen3-8b": dict(zip(_DENSE, (4096, 36, 32, 8, 128, 12288, 151936), strict=True), tie_word_embeddings=False),
    "qwen3-14b": dict(zip(_DENSE, (5120, 40, 40, 8, 128, 17408, 151936), strict=True), tie_word_embeddings=False),
    "qwen3-32b": dict(zip(_DENSE, (5120, 64, 64, 8, 128, 25600, 151936), strict=True), tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(zip(_DENSE, (2048, 48, 32, 4, 128, 6144, 151936), strict=True), tie_word_embeddings=False,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}
"""Qwen3 shapes by lowercase model name (``Qwen/Qwen3-8B-Base`` -> ``qwen3-8b``); ``tiny`` is the
CPU smoke runs' model."""


def shape_of(ref: str) -> dict[str, Any]:
    """The shape of a model reference: a local directory's ``config.json``, or a stock Qwen3 name
    (hub id, with or without ``-Base``); a one-line error otherwise."""
    config = Path(ref) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        return cfg
    name = ref.rstrip("/").split("/")[-1].lower().removesuffix("-base")
    if name not in SHAPES:
        raise LopdError(f"model {ref!r}: no config.json there and not a known shape ({', '.join(SHAPES)})")
    return SHAPES[name]


def matmul_params(s: dict[str, Any]) -> int:
    """Parameters a token goes through in matmuls: each layer's projections (a MoE layer's active
    experts and router), and the LM head."""
    d, hd, nh, nkv = (s[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads"))
    attn = d * hd * (nh + 2 * nkv) + nh * hd * d
    if s.get("num_experts"):
        mlp = s["num_experts_per_tok"] * 3 * d * s["moe_intermediate_size"] + d * s["num_experts"]
    else:
        mlp = 3 * d * s["intermediate_size"]
    return s["num_hidden_layers"] * (attn + mlp) + d * s["vocab_size"]


def flops_per_token(s: dict[str, Any], ctx: float, passes: str = "train") -> float:
    """Model FLOPs per token at mean causal context ``ctx``: ``train`` = forward + backward
    (6·P + 12·L·H·d_head·ctx); ``forward`` = one forward (2·P + 4·L·H·d_head·ctx: scoring)."""
    attn = s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * ctx
    if passes == "train":
        return 6 * matmul_params(s) + 12 * attn
    return 2 * matmul_params(s) + 4 * attn


__all__ = ["PEAK_BF16", "SHAPES", "flops_per_token", "matmul_params", "shape_of"]

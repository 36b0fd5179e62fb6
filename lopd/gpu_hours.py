"""``lopd recipe estimate``: the GPU-hours of a recipe's distillation phase, per method.

    tokens per method, from the recipe (prompts, samples per prompt, updates, batch) and the mean
    prompt and response lengths:
        lightning      the student samples every OPD prompt once (``precompute.sampling.n`` times),
                       the teacher scores those rollouts once, training makes ``opd.train.steps``
                       updates of ``opd.train.global_batch`` sequences on them
        online         every update samples ``global_batch`` fresh sequences with the current student
                       and the teacher scores them, then trains on them
        seqkd          the teacher answers every OPD prompt once; the same updates, as SFT
        sft-continued  the same updates, as SFT on the existing data (training only)
    GPU-seconds = tokens × model FLOPs per token / (MFU × peak)    training and scoring (lopd.flops)
                = tokens / decode rate                            sampling

The SFT student and the evaluation cost every method the same and are left out. The rates are
:class:`Rates`; each default names where it comes from, and what is assumed is said so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.flops import PEAK_BF16, flops_per_token, matmul_params, shape_of

METHODS = ("lightning", "online", "seqkd", "sft-continued")
DECODE_REF_PARAMS = 8e9
"""The model size the decode rate is given for; other sizes scale it by ``8e9 / params``
(decoding is bound by reading the weights)."""


@dataclass(frozen=True)
class Rates:
    """Per-GPU rates on one H100."""

    train_mfu: float = 0.184
    """Measured: lopd's OPD step on the Qwen3-1.7B shape, ZeRO-2, one H100 (docs/gpu.md)."""
    score_mfu: float = 0.184
    """Assumed equal to training's: teacher scoring (a forward) has not been measured on a GPU yet."""
    decode_tok_s: float = 3000.0
    """Assumed: output tokens/s of vLLM sampling an 8B model on one H100; third-party vLLM
    benchmarks report ~3,000-12,500 for Llama-3.1-8B, the low end for long outputs (small batches)."""


def count_prompts(uri: str) -> int | None:
    """Rows of a local JSONL prompts file; None for a store URI (give the count instead)."""
    path = Path(uri)
    if "://" in uri or not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def estimate(recipe: Any, response_tokens: int, prompt_tokens: int, opd_prompts: int | None = None,
             rates: Rates = Rates()) -> dict[str, dict[str, float]]:
    """Tokens and GPU-hours of each of :data:`METHODS` (sampled, scored and trained tokens; GPU-hours
    sampling, scoring, training and in all)."""
    if recipe.opd is None or recipe.precompute is None:
        raise LopdError("recipe estimate: the recipe needs opd and precompute sections")
    n = opd_prompts if opd_prompts is not None else count_prompts(recipe.precompute.prompts)
    if n is None:
        raise LopdError(f"recipe estimate: precompute.prompts {recipe.precompute.prompts!r} is not a local file; "
                        "give --opd-prompts")
    student, teacher = shape_of(recipe.models.student.uri), shape_of(recipe.models.teacher.uri)
    seq = prompt_tokens + response_tokens
    ctx = seq / 2

    def hours_train(tokens: float) -> float:
        return tokens * flops_per_token(student, ctx) / (rates.train_mfu * PEAK_BF16) / 3600

    def hours_score(tokens: float) -> float:
        return tokens * flops_per_token(teacher, ctx, "forward") / (rates.score_mfu * PEAK_BF16) / 3600

    def hours_decode(tokens: float, shape: dict[str, Any]) -> float:
        return tokens / (rates.decode_tok_s * DECODE_REF_PARAMS / matmul_params(shape)) / 3600

    t = recipe.opd.train
    trained = t.steps * t.global_batch
    rollouts = n * recipe.precompute.sampling.n
    out = {}
    for method, sampled, by, scored in (("lightning", rollouts, student, rollouts),
                                        ("online", trained, student, trained),
                                        ("seqkd", n, teacher, 0), ("sft-continued", 0, student, 0)):
        h = {"sample": hours_decode(sampled * response_tokens, by), "score": hours_score(scored * seq),
             "train": hours_train(trained * seq)}
        out[method] = {"sampled_tokens": float(sampled * response_tokens), "scored_tokens": float(scored * seq),
                       "trained_tokens": float(trained * seq), **{f"gpu_h_{k}": v for k, v in h.items()},
                       "gpu_h": sum(h.values())}
    return out


def table(est: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per method, GPU-hours by phase and relative to Lightning OPD."""
    base = est["lightning"]["gpu_h"]
    lines = ["| method | sampled tokens | scored tokens | trained tokens | GPU-h sampling | GPU-h scoring | "
             "GPU-h training | GPU-h | × lightning |", "|---|---|---|---|---|---|---|---|---|"]
    for method, e in est.items():
        cells = [f"{e[k] / 1e6:,.0f}M" for k in ("sampled_tokens", "scored_tokens", "trained_tokens")]
        cells += [f"{e[k]:.1f}" for k in ("gpu_h_sample", "gpu_h_score", "gpu_h_train", "gpu_h")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {e['gpu_h'] / base:.2f}× |")
    return "\n".join(lines) + "\n"


__all__ = ["METHODS", "Rates", "count_prompts", "estimate", "table"]

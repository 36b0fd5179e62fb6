"""One SFT optimizer step: cross-entropy on the assistant tokens, packed micro-batches.

Per step: this rank's share of the global batch → micro-batches under the token budget
(packed rows with per-sequence positions, or padded rows) → per micro-batch
``sum_t -log p(y_t) / N_global`` (token mean over the global batch's assistant tokens),
backward → one clipped AdamW step at the schedule's learning rate.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from lopd.recipe import SftConfig
from lopd.train import losses as L
from lopd.train.engine import forward_logprobs
from lopd.train.packing import MicroBatch, Seq, make_micro_batches
from lopd.train.step import accumulate_and_step, batch_counts, plan_step

PLOT_KEYS = ["loss", "grad_norm", "lr", "tokens_per_s"]


def sft_micro_loss(engine, mb: MicroBatch, num_targets: float, world: int,
                   num_chunks: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_t -log p(y_t) / N_global`` of one micro-batch (times ``world``: DeepSpeed averages over
    ranks) and its loss as a float64 device scalar (summed and read once per step)."""
    lp, _ = forward_logprobs(engine, mb, num_chunks, entropy=False)  # the same LM-head calls on every rank
    w = L.token_weights(torch.ones_like(lp), mb.seq_index, "token-mean", num_tokens=num_targets)
    loss = L.aggregate(L.sft_loss_per_token(lp), w)
    return loss * world, {"loss": loss.detach().double()}


def sft_step(engine, seqs: list[Seq], cfg: SftConfig, lr: float, world: int) -> dict[str, float]:
    """One optimizer step on this rank's sequences; returns global metrics."""
    t0 = time.perf_counter()
    seqs = [dataclasses.replace(s, index=i) for i, s in enumerate(seqs)]
    mbs = make_micro_batches(seqs, cfg.train.micro_batch_tokens, packing=cfg.packing,
                             flat=cfg.train.attention == "varlen")
    plan = plan_step(engine, mbs, batch_counts(mbs))
    sums = plan.totals
    out = accumulate_and_step(engine, mbs, lambda e, mb, k: sft_micro_loss(e, mb, sums["targets"], world, k), lr,
                              plan, ("loss",))
    dt = time.perf_counter() - t0
    return {"loss": out["loss"], "grad_norm": out["grad_norm"], "lr": lr, "tokens_per_s": sums["tokens"] / dt,
            "target_tokens": sums["targets"], "pad_fraction": 1.0 - sums["tokens"] / max(sums["padded"], 1.0),
            "step_time_s": dt}

"""One OPD optimizer step (offline and online share it) and the per-step metrics.

Algorithm (per step, Lightning OPD, arXiv 2604.13010):

1. take this rank's share of the global batch of rollouts (with teacher log-probs);
2. pack it into micro-batches under ``micro_batch_tokens``;
3. without grad, compute ``log p_old`` of every response token (the policy at batch start); with
   one PPO mini-batch the policy at batch start is the policy being differentiated, so
   ``log p_old = sg(log p)`` of the training forward itself and this pass is skipped;
4. for each micro-batch: ``A_t = log p_teacher - log p_old``, PPO-clip loss, normalised by the
   global token (or sequence) count, backward; then one clipped AdamW step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lopd.recipe import OpdConfig
from lopd.train import losses as L
from lopd.train.data import OpdSample, rank_share
from lopd.train.engine import device, forward_logprobs
from lopd.train.packing import MicroBatch, dummy_micro_batch, make_micro_batches
from lopd.train.step import accumulate_and_step, batch_counts, plan_step
from lopd.train.topk import topk_inputs, topk_loss_per_token

STAT_KEYS = ("loss", "adv_sum", "kl_sum", "clip_sum", "ent_sum")
"""The per-micro-batch stats (device scalars, summed over micro-batches and ranks)."""
SUM_KEYS = (*STAT_KEYS, "tokens", "targets", "seqs")
"""Everything summed over a step: the stats and the host-known counts."""


@dataclass
class Counts:
    """Global (all ranks) counts of one batch, for the normalisation of every micro-batch."""

    targets: float
    seqs: float
    world: int


def batch_seqs(samples: list[OpdSample], first_index: int) -> list:
    return [s.to_seq(first_index + i) for i, s in enumerate(samples)]


@torch.no_grad()
def attach_old_logprobs(engine, mbs: list[MicroBatch]) -> None:
    """``log p_old`` (current weights, no grad) of every target, stored as ``extras['old_logprobs']``.

    Every rank makes the same forward passes, at ZeRO-3 with the same LM-head calls
    (:func:`~lopd.train.step.plan_step`): a rank with fewer micro-batches runs dummy forwards,
    as in the training passes (ZeRO-3 would otherwise hang on a parameter all-gather the other
    ranks never join)."""
    dev = device()
    for i, chunks in enumerate(plan_step(engine, mbs).chunks):
        lp, _ = forward_logprobs(engine, (mbs[i] if i < len(mbs) else dummy_micro_batch()).to(dev), chunks,
                                 entropy=False)
        if i < len(mbs):
            mbs[i].extras["old_logprobs"] = lp.float()  # stays on the device: no host sync


def opd_micro_loss(engine, mb: MicroBatch, cfg: OpdConfig, counts: Counts, num_chunks: int | None = None,
                   old_from_current: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, scaled so that the sum over micro-batches and the mean over
    ranks (DeepSpeed's gradient averaging) is the global-batch loss; plus summable stats
    (detached float64 scalars on the device, read once per step by
    :func:`~lopd.train.step.accumulate_and_step`). ``num_chunks``: at least this many LM-head calls
    (:func:`~lopd.train.step.plan_step`).
    ``old_from_current``: ``log p_old = sg(log p)`` of this forward (one PPO mini-batch: the
    weights have not moved since the batch started, so the ratio is exactly 1) instead of
    ``extras['old_logprobs']``."""
    if cfg.objective == "topk":
        tk, lp, ent = forward_logprobs(engine, mb, num_chunks, topk=topk_inputs(mb))
    else:
        lp, ent = forward_logprobs(engine, mb, num_chunks)
    zero = torch.zeros(lp.shape[0], device=lp.device)
    ex = {k: mb.extras.get(k, zero) for k in ("teacher_logprobs", "rollout_logprobs", "old_logprobs")}
    if old_from_current:
        ex["old_logprobs"] = lp.detach().float()
    iw = cfg.importance_weights
    if cfg.objective == "topk":
        per_tok, st = topk_loss_per_token(tk, lp, ex["old_logprobs"], ex["teacher_logprobs"], ex["rollout_logprobs"],
                                          kl_coef=cfg.kl_coef)
    else:
        per_tok, st = L.opd_loss_per_token(lp, ex["old_logprobs"], ex["teacher_logprobs"], ex["rollout_logprobs"],
                                           clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                           iw_cap=iw.cap if iw.enabled else None, kl_coef=cfg.kl_coef)
    w = L.token_weights(torch.ones_like(lp), mb.seq_index, cfg.loss_agg, counts.targets, counts.seqs)
    loss = L.aggregate(per_tok, w)
    stats = {"loss": loss.detach(), "adv_sum": st["advantage"].sum(), "kl_sum": st["kl_ref"].sum(),
             "clip_sum": st["clipped"].sum(), "ent_sum": ent.detach().sum()}
    return loss * counts.world, {k: v.double() for k, v in stats.items()}  # summed in float64


def opd_step(engine, minis: list[list[OpdSample]], cfg: OpdConfig, lr: float, world: int,
             old_pass: bool | None = None) -> dict[str, float]:
    """One global batch on this rank: ``minis[j]`` is this rank's part of PPO mini-batch ``j``.

    ``log p_old`` of every mini-batch is computed first (the policy at the start of the batch),
    then one optimizer update per mini-batch. ``old_pass``: run that no-grad pass; None = only
    when there is more than one mini-batch (with one, ``log p_old = sg(log p)`` of the training
    forward, equal to the pass's values; ``len(minis)`` is the recipe's ``mini_batches`` on every
    rank, so every rank makes the same forward calls). Returns global metrics (identical on every
    rank): loss, advantage mean (≈ −reverse KL to the teacher per token), reverse_kl_est, kl_to_sft
    (k3 estimate of KL(sampler || current) on the rollouts: the SFT policy offline; online the
    sampler is the current policy, so it checks that the sampler got the weights and stays ~0),
    clip_frac, entropy, grad_norm (of the last update), tokens_per_s.
    """
    t0 = time.perf_counter()
    if old_pass is None:
        old_pass = len(minis) > 1
    batches = [make_micro_batches(batch_seqs(m, 0), cfg.train.micro_batch_tokens, packing=True,
                                  flat=cfg.train.attention == "varlen") for m in minis]
    if old_pass:
        for mbs in batches:
            attach_old_logprobs(engine, mbs)
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    for mini, mbs in zip(minis, batches, strict=True):
        plan = plan_step(engine, mbs, {**batch_counts(mbs), "seqs": float(len(mini))})
        counts = Counts(plan.totals["targets"], plan.totals["seqs"], world)
        local = accumulate_and_step(engine, mbs, lambda e, mb, k, c=counts: opd_micro_loss(
            e, mb, cfg, c, k, old_from_current=not old_pass), lr, plan, STAT_KEYS)
        for k in SUM_KEYS:
            sums[k] += local[k] if k in STAT_KEYS else plan.totals[k]
    dt = time.perf_counter() - t0
    n = max(sums["targets"], 1.0)
    return {"loss": sums["loss"] / len(minis), "adv_mean": sums["adv_sum"] / n,
            "reverse_kl_est": -sums["adv_sum"] / n, "kl_to_sft": sums["kl_sum"] / n, "clip_frac": sums["clip_sum"] / n,
            "entropy": sums["ent_sum"] / n, "grad_norm": local["grad_norm"], "tokens_per_s": sums["tokens"] / dt,
            "response_tokens": sums["targets"], "step_time_s": dt, "lr": lr}


def split_minis(global_batch: list, mini_batches: int, rank: int, world: int) -> list[list]:
    """This rank's part of each PPO mini-batch of a global batch (mini ``j`` = items ``j::M``,
    then every ``world``-th item of it), so 1 rank and N ranks see the same mini-batches."""
    return [rank_share(global_batch[j::mini_batches], rank, world) for j in range(mini_batches)]


PLOT_KEYS = ["loss", "reverse_kl_est", "kl_to_sft", "clip_frac", "entropy", "grad_norm", "tokens_per_s", "lr"]

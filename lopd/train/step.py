"""The optimizer step SFT and OPD share: passes planned in lock step across ranks, forward and
backward of every micro-batch, one optimizer step, with two host syncs per step.

- :func:`plan_step` (the step's start): one all-gather gives every rank the most micro-batches of
  any rank (a rank with fewer runs :func:`~lopd.train.packing.dummy_micro_batch` passes after its
  own: every rank must make the same number of backward passes, or the gradient reductions never
  match) and the global sums of the batch's host-known counts (targets, tokens, sequences), which
  normalise the losses. ZeRO-3 adds one all-reduce: it all-gathers the parameters of every module
  call, so ranks must also make the same LM-head calls (:func:`chunk_plan`).
- :func:`accumulate_and_step` (its end): the per-micro-batch stats stay on the device, are summed
  across ranks there (on NCCL without waiting for the host), and are read together with the
  gradient norm in one transfer after the optimizer step.

Losses arrive normalised by *global* counts times the world size (DeepSpeed averages gradients
over ranks), so 1 rank and N ranks compute the same step for the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lopd.train.engine import device, set_lr
from lopd.train.losses import chunk_count
from lopd.train.packing import MicroBatch, dummy_micro_batch

LossFn = Callable[[object, MicroBatch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(engine, mb, num_chunks)`` → (the micro-batch's loss, already scaled for global
averaging; summable stats as detached float64 scalar tensors on the device)."""


def comm_device() -> torch.device:
    """Where collective tensors live: the GPU under NCCL, the CPU under gloo."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few scalars (float64) across ranks (one host sync)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


@dataclass
class StepPlan:
    """What every rank agrees on before a step's passes."""

    chunks: list[int]
    """One entry per pass (``len`` = the most micro-batches any rank has): at least this many
    LM-head calls (``num_chunks`` of :func:`~lopd.train.engine.forward_logprobs`), the same on
    every rank."""
    totals: dict[str, float]
    """Global sums (all ranks) of the counts given to :func:`plan_step`."""


def chunk_plan(engine, micro_batches: list[MicroBatch], passes: int) -> list[int]:
    """The most LM-head chunks any rank needs for its micro-batch ``i``, for each of ``passes``
    passes (a dummy micro-batch's where a rank has run out): one all-reduce (MAX)."""
    chunk = engine.module.chunk_size
    dummy = dummy_micro_batch().num_targets
    local = [chunk_count(micro_batches[i].num_targets if i < len(micro_batches) else dummy, chunk)
             for i in range(passes)]
    return [int(c) for c in all_reduce(local, "max")]


def plan_step(engine, micro_batches: list[MicroBatch], counts: dict[str, float] | None = None) -> StepPlan:
    """The passes every rank makes over its micro-batches, and the global sums of ``counts`` (this
    rank's, e.g. its target tokens): one all-gather, plus :func:`chunk_plan` at ZeRO-3. Below ZeRO-3
    a rank's LM-head calls are its own business; every pass makes at least one, so every rank's
    head produces a gradient in every backward."""
    counts = counts or {}
    local = torch.tensor([float(len(micro_batches)), *counts.values()], dtype=torch.float64, device=comm_device())
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    table = torch.stack(rows).tolist()  # the step's one read at its start
    passes = int(max(r[0] for r in table))
    totals = {k: math.fsum(r[j + 1] for r in table) for j, k in enumerate(counts)}
    if engine.zero_optimization_stage() == 3 and passes:
        return StepPlan(chunk_plan(engine, micro_batches, passes), totals)
    return StepPlan([1] * passes, totals)


def batch_counts(micro_batches: list[MicroBatch]) -> dict[str, float]:
    """This rank's host-known counts of a batch, for :func:`plan_step` to sum across ranks: target
    tokens, real tokens, and tokens with the filler (``padded``)."""
    return {"targets": float(sum(mb.num_targets for mb in micro_batches)),
            "tokens": float(sum(mb.real_tokens for mb in micro_batches)),
            "padded": float(sum(mb.input_ids.numel() for mb in micro_batches))}


def accumulate_and_step(engine, micro_batches: list[MicroBatch], loss_fn: LossFn, lr: float, plan: StepPlan,
                        stat_keys: tuple[str, ...]) -> dict[str, float]:
    """Forward/backward every pass of ``plan`` (this rank's micro-batches, then dummies), then one
    optimizer step. Returns the stats named ``stat_keys`` (the same on every rank; 0 where a rank
    has none) summed over every rank's micro-batches, plus ``grad_norm`` (before clipping), read
    in one transfer after the step."""
    stats: dict[str, torch.Tensor] = {}
    dev = device()
    n = len(plan.chunks)
    for i, chunks in enumerate(plan.chunks):
        real = i < len(micro_batches)
        mb = micro_batches[i] if real else dummy_micro_batch()
        engine.set_gradient_accumulation_boundary(i == n - 1)
        loss, s = loss_fn(engine, mb.to(dev), chunks)
        engine.backward(loss if real else loss * 0.0, scale_wrt_gas=False)  # a dummy adds no gradient
        for k, v in (s.items() if real else ()):
            stats[k] = stats[k] + v if k in stats else v
    parts = []  # float64 vectors on the collective device, read together after the step
    if stat_keys:
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        parts.append(torch.stack([stats.get(k, zero).reshape(()) for k in stat_keys]).to(comm_device()))
        if dist.get_world_size() > 1:
            dist.all_reduce(parts[0])  # enqueued: nothing waits for it until the read below
    set_lr(engine, lr)
    pre = _grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    norm = pre if pre is not None else engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        parts.append(norm.reshape(1).double().to(comm_device()))
    values = torch.cat(parts).tolist() if parts else []
    if isinstance(norm, torch.Tensor):
        grad_norm = values.pop()
    else:
        grad_norm = float(norm) if norm is not None else float("nan")
    return {**dict(zip(stat_keys, values, strict=True)), "grad_norm": grad_norm}


def _grad_norm(engine) -> torch.Tensor | float:
    """Global L2 norm of the (already all-reduced) gradients under ZeRO-0, before clipping: the
    per-parameter float32 sums of squares summed in float64, left on the device."""
    sq = [p.grad.float().pow(2).sum().double() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(sq).sum().sqrt() if sq else 0.0

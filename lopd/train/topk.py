"""The top-k OPD objective: reverse KL to the teacher on its stored top-k support, as a pure
function of the student's hidden states and LM head (``opd.objective: topk``).

Notation: ``N`` selected response positions, ``H`` hidden size, ``V`` vocabulary, ``k`` the
teacher's stored top-k (``precompute.teacher_topk``). At position t with context
``c_t = (x, y_<t)``, ``p`` is the student's ``softmax(z_t / T)`` and ``q`` the teacher's
distribution (stored: its top-k ids and log-probs, plus ``log q(y_t)`` of the sampled token).
The support is ``S_t = topk_t ∪ {y_t}`` (``k`` or ``k + 1`` tokens) and the rest is pooled into
one *tail* bin ``R_t = V \\ S_t`` with ``p(R) = 1 − Σ_{v∈S} p(v)``, ``q(R) = 1 − Σ_{v∈S} q(v)``:

    l_t = Σ_{v∈S_t} p(v) [log p(v) − log q(v)]  +  p(R_t) [log p(R_t) − log q(R_t)]

that is, ``KL(p̄ || q̄)`` (student first: the reverse KL OPD minimises) between the two
distributions coarsened to the ``|S_t| + 1`` outcomes ``S_t ∪ {R_t}``. It is computed exactly
(no sampling over v) and differentiated through ``p`` alone (the teacher is data).

Properties and bias:

- ``l_t ≥ 0``, and ``l_t = 0`` (with zero gradient) iff ``p = q`` on ``S_t`` (hence also
  ``p(R) = q(R)``); with ``k = V`` it *is* ``KL(p || q)``, value and gradient.
- For ``k < V`` it is a lower bound (data-processing inequality):
  ``KL(p || q) − l_t = p(R) · KL(p(·|R) || q(·|R)) ≥ 0``; the student's shape *inside* the tail
  is not matched, only the tail's total mass. The bias is small when the teacher's top-k
  holds almost all of its mass, as for a reasoning teacher's mostly peaked next-token
  distributions.
- Why a tail bin: restricting the sum to ``S`` without it has its minimum at ``p(v) = q(v)/e``
  on ``S`` (the student is rewarded for moving mass out of the support); renormalising both
  over ``S`` ignores how much mass the student puts outside ``S`` at all. The tail bin keeps
  the objective a divergence with the teacher's own mass outside its top-k as the target.
- ``q(R)`` comes from the stored log-probs, ``1 − Σ_S exp(log q)``, floored at ``TAIL_FLOOR``
  (rounding can push the sum to 1 or past it; a teacher tail below the floor pulls the student's
  toward the floor, not below it, and "teacher = student gives 0" holds for tails above it or
  empty); ``p(R)`` is exact: a logsumexp over the logits
  with ``S`` masked out (masked entries are set ``MASK_OFFSET`` below the row maximum, so an
  empty tail gives ``p(R) = 0`` with finite, zero gradients).
- What stays of Lightning OPD's off-policy bias: the contexts ``c_t`` are the SFT student's
  rollouts, not the current student's, so the per-position divergence is exact but averaged
  over another policy's prefixes (the same state distribution as the sampled objective).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from lopd.train.losses import gather_selected, kl_k3_per_token, opd_advantage
from lopd.train.varlen import varlen_kwargs

TAIL_FLOOR = 1e-6
"""Smallest teacher tail mass ``q(R)`` used (its stored top-k log-probs may sum to ≥ 1 after rounding)."""
MASK_OFFSET = 1e4
"""Logits of the support are set this far below the row maximum when summing the student's tail."""


def _up(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def topk_support(targets: torch.Tensor, teacher_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The support ``S_t = topk_t ∪ {y_t}``: (ids ``[N, k+1]`` int64, teacher log-probs ``[N, k+1]``,
    valid ``[N, k+1]`` bool). The last column is the sampled token, invalid when it is already in the
    top-k (so no token counts twice). Inputs: targets ``[N]``, teacher_logprobs ``[N]`` (of the
    sampled tokens), topk_ids ``[N, k]``, topk_logprobs ``[N, k]``."""
    targets = targets.long()
    ids = torch.cat([topk_ids.long(), targets[:, None]], dim=-1)
    lps = torch.cat([_up(topk_logprobs), _up(teacher_logprobs).to(_up(topk_logprobs).dtype)[:, None]], dim=-1)
    fresh = ~(topk_ids.long() == targets[:, None]).any(-1, keepdim=True)
    valid = torch.cat([torch.ones_like(topk_ids, dtype=torch.bool), fresh], dim=-1)
    return ids, lps, valid


def _chunk_topk(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                ids: torch.Tensor, t_lps: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n, 3]`` (l_t, log p(y_t), entropy) for one chunk; its ``[n, V]`` logits live only inside."""
    z = _up(head(hidden))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp_y = z.gather(-1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    s_lps = z.gather(-1, ids) - lse[:, None]  # student log p on the support
    fill = (z.detach().amax(-1, keepdim=True) - MASK_OFFSET).expand_as(ids)
    s_tail = torch.logsumexp(z.scatter(-1, ids, fill), dim=-1) - lse  # log p(R), exact
    t_lps = t_lps.to(z.dtype)
    mass = torch.logsumexp(t_lps.masked_fill(~valid, float("-inf")), dim=-1)  # log Σ_S q
    t_tail = torch.log((-torch.expm1(mass)).clamp(min=TAIL_FLOOR))  # log q(R)
    on_support = (s_lps.exp() * (s_lps - t_lps) * valid.to(z.dtype)).sum(-1)
    loss = on_support + s_tail.exp() * (s_tail - t_tail)
    return torch.stack([loss, logp_y, entropy], dim=-1)


def chunked_topk_kl(hidden: torch.Tensor, head: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                    targets: torch.Tensor, teacher_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                    topk_logprobs: torch.Tensor, chunk_size: int = 1024, num_chunks: int | None = None,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token top-k reverse KL ``l_t`` (module docstring), with the log-probs and entropies of
    :func:`lopd.train.losses.chunked_logprobs` from the same LM-head pass.

    Args: hidden ``[N, H]`` final hidden states at the positions that predict ``targets``; head the
    LM head, a weight ``[V, H]`` or a module/callable ``[n, H] -> [n, V]``; targets ``[N]`` int64 (the
    sampled tokens ``y_t``); teacher_logprobs ``[N]`` (``log q(y_t)``); topk_ids ``[N, k]`` (any integer
    dtype); topk_logprobs ``[N, k]`` (any float dtype). Returns (loss ``[N]``, logp ``[N]``, entropy
    ``[N]``), float32 (float64 for float64 inputs); only ``loss`` and ``logp`` are meant to carry
    gradient into a loss, the entropy is a metric.

    Chunking, activation checkpointing and ``num_chunks`` (the exact number of LM-head calls, padded
    with empty chunks, for ZeRO-3's lockstep) behave as in ``chunked_logprobs``: peak extra memory is
    O(chunk_size · V), never O(N · V).
    """
    fn = (lambda h: h @ head.t()) if isinstance(head, torch.Tensor) else head
    ids, t_lps, valid = topk_support(targets, teacher_logprobs, topk_ids, topk_logprobs)
    n = hidden.shape[0]
    if n == 0 and num_chunks is None:
        z = _up(fn(hidden[:0])).sum(-1)  # keeps the graph connected (ZeRO-3 hooks still fire)
        return z, z, z
    params = [head] if isinstance(head, torch.Tensor) else list(getattr(head, "parameters", list)())
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    starts = list(range(0, n, chunk_size))
    starts += [n] * (max(num_chunks or 0, len(starts), 1) - len(starts))  # padding: empty chunks [n:n]
    outs = []
    for s in starts:
        args = (hidden[s:s + chunk_size], fn, targets[s:s + chunk_size].long(), ids[s:s + chunk_size],
                t_lps[s:s + chunk_size], valid[s:s + chunk_size], temperature)
        outs.append(checkpoint(_chunk_topk, *args, use_reentrant=False) if grad else _chunk_topk(*args))
    out = torch.cat(outs, dim=0)
    return out[:, 0], out[:, 1], out[:, 2]


def model_topk_kl(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  targets: torch.Tensor, select: torch.Tensor, teacher_logprobs: torch.Tensor,
                  topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  chunk_size: int = 1024, num_chunks: int | None = None, temperature: float = 1.0,
                  cu_seqlens: torch.Tensor | None = None,
                  max_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_topk_kl` of a causal LM, the counterpart of ``lopd.train.losses.model_logprobs``.

    input_ids / position_ids / targets / select ``[B, L]`` (select: the positions whose next token
    is scored, or their flat positions ``[N]``: ``lopd.train.losses.gather_selected``), optional
    attention_mask ``[B, L]``; teacher_logprobs ``[N]``, topk_ids / topk_logprobs ``[N, k]``
    aligned with the selected positions in row-major order (``MicroBatch.extras``); ``cu_seqlens`` /
    ``max_seqlen``: a flat micro-batch's boundaries (``lopd.train.varlen.varlen_kwargs``).
    Returns (loss, logp, entropy), each ``[N]``.
    """
    out = model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **varlen_kwargs(cu_seqlens, max_seqlen))
    return chunked_topk_kl(gather_selected(out.last_hidden_state, select), model.get_output_embeddings(),
                           gather_selected(targets, select),
                           teacher_logprobs, topk_ids, topk_logprobs, chunk_size, num_chunks, temperature)


def topk_inputs(mb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher_logprobs ``[N]``, topk_ids ``[N, k]``, topk_logprobs ``[N, k]``) of a
    :class:`lopd.train.packing.MicroBatch`, from its extras; zeros (``k = 1``) for a micro-batch
    without them (:func:`lopd.train.packing.dummy_micro_batch`, whose loss is multiplied by 0), so
    every rank makes the same LM-head calls."""
    n, dev, ex = mb.num_targets, mb.select.device, mb.extras
    if "teacher_topk_ids" in ex:
        return ex["teacher_logprobs"], ex["teacher_topk_ids"], ex["teacher_topk_logprobs"]
    return (torch.zeros(n, device=dev), torch.zeros((n, 1), dtype=torch.long, device=dev),
            torch.zeros((n, 1), device=dev))


def topk_loss_per_token(topk_kl: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        teacher_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None = None, *,
                        kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``opd.objective: topk`` per-token loss and the stats of ``lopd.train.losses.opd_loss_per_token``.

    ``loss_t = l_t`` (``topk_kl``, from :func:`chunked_topk_kl`) plus ``kl_coef ·`` the k3 KL-to-SFT
    penalty on the sampled token (as the sampled objective adds it). No ratio and no clip: ``l_t``
    is a divergence of the current weights, not a surrogate around ``log p_old``. Stats, all ``[N]``:
    ``advantage`` (``log q(y_t) − log p_old(y_t)``, for the ``reverse_kl_est`` metric), ``clipped``
    (zeros) and ``kl_ref``. Inputs ``[N]``."""
    ref = rollout_logprobs if rollout_logprobs is not None else old_logprobs
    kl = kl_k3_per_token(logprobs, ref)
    loss = _up(topk_kl) + kl_coef * kl if kl_coef > 0.0 else _up(topk_kl)
    return loss, {"advantage": opd_advantage(teacher_logprobs, old_logprobs), "clipped": torch.zeros_like(loss),
                  "kl_ref": kl.detach()}


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reference: exact ``KL(p || q) = Σ_v p(v) [log p(v) − log q(v)]`` per row of ``[N, V]`` logits
    (student first), computed from the full distributions; ``[N]``."""
    lp, lq = torch.log_softmax(_up(student_logits), -1), torch.log_softmax(_up(teacher_logits), -1)
    return (lp.exp() * (lp - lq)).sum(-1)

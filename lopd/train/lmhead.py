"""Per-token log-probs through the LM head, chunked, with a fused backward.

For final hidden states ``h [N, H]``, an LM head ``W [V, H]`` and targets ``y [N]``, with
``z = (h W^T) / T`` (upcast to float32; float64 stays float64):

    log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}
    entropy_t  = logsumexp_v z_{t, v} - sum_v softmax(z_t)_v z_{t, v}

The gradient of ``sum_t g_t log p(y_t)`` w.r.t. the logits is ``G = g (onehot(y) - softmax(z)) / T``;
then ``dL/dh = G W`` and ``dL/dW = G^T h``. :class:`FusedHeadLogprob` computes this chunk by chunk:
the forward keeps only ``h``, ``W``, ``y`` and the ``[n]`` logsumexp; the backward recomputes the
chunk's logits, forms ``G`` in place and runs the two matrix products. No ``[n, V]`` tensor lives
between the forward and the backward, and the entropy (a metric) is computed in the forward,
without autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Head = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (float64 stays float64, for exactness tests)."""
    return x if x.dtype == torch.float64 else x.float()


def _tempered(raw: torch.Tensor, temperature: float) -> torch.Tensor:
    z = upcast(raw)
    return z / temperature if temperature != 1.0 else z


def head_stats(raw: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
               entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(log p(y) ``[n]``, entropy ``[n]`` or None, logsumexp ``[n]``) of raw logits ``[n, V]``
    (any dtype) divided by ``temperature``; differentiable in ``raw`` when grad is enabled."""
    z = _tempered(raw, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    ent = None
    if entropy:
        with torch.no_grad():
            ent = lse.detach() - (torch.softmax(z.detach(), dim=-1) * z.detach()).sum(-1)
    return logp, ent, lse


class FusedHeadLogprob(torch.autograd.Function):
    """``log p(y)`` of one chunk, differentiable in ``hidden [n, H]`` and ``weight [V, H]``.

    ``logits_fn(hidden)`` must equal ``hidden @ weight.T`` (it is the head itself when the head is
    a module, so its hooks run on every call: once in the forward, once in the backward).
    Returns (logp ``[n]``, entropy ``[n]``, not differentiable; ``[0]`` when not asked for).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, logits_fn, entropy):
        logp, ent, lse = head_stats(logits_fn(hidden), targets, temperature, entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.logits_fn = temperature, logits_fn
        ent = ent if ent is not None else logp.new_zeros(0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if g_logp is None or not (need_h or need_w):
            return None, None, None, None, None, None
        with torch.no_grad():
            raw = ctx.logits_fn(hidden)
            dtype = raw.dtype
            z = _tempered(raw, ctx.temperature)  # may be raw itself: overwritten in place below
            del raw
            g = upcast(g_logp).unsqueeze(-1)
            grad = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g)  # -g softmax(z)
            grad.scatter_add_(-1, targets.unsqueeze(-1), g)  # + g onehot(y)
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            grad = grad.to(dtype)
            del z
            gh = grad @ weight if need_h else None
            gw = grad.t() @ hidden if need_w else None
        return gh, gw, None, None, None, None


def head_weight(head: Head) -> torch.Tensor | None:
    """The ``[V, H]`` weight the fused path differentiates: the head itself when it is a tensor,
    the weight of a bias-free ``torch.nn.Linear``; None for other callables and for a weight ZeRO-3
    has partitioned (only the module's own call gathers it), which take the checkpointed path."""
    if isinstance(head, torch.Tensor):
        return head
    if type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id"):
        return head.weight
    return None


def _reference_stats(hidden: torch.Tensor, logits_fn, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n, 2]`` (log p, entropy), both under autograd: the unfused reference."""
    logits = _tempered(logits_fn(hidden), temperature)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return torch.stack([logp, entropy], dim=-1)


def _checkpointed_stats(hidden: torch.Tensor, logits_fn, targets: torch.Tensor, temperature: float,
                        entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ent, _ = head_stats(logits_fn(hidden), targets, temperature, entropy)
    return logp, ent if ent is not None else logp.new_zeros(0).detach()


def chunk_count(num_positions: int, chunk_size: int) -> int:
    """LM-head calls :func:`chunked_logprobs` needs for ``num_positions`` positions: ``ceil(N / chunk)``."""
    return -(-int(num_positions) // int(chunk_size))


def chunked_logprobs(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_size: int = 1024,
                     num_chunks: int | None = None, temperature: float = 1.0, entropy: bool = True,
                     fused: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs and entropies through the LM head, ``chunk_size`` positions at a time.

    Args: hidden ``[N, H]`` final hidden states at the positions that predict ``targets``, head the
    LM head: a weight ``[V, H]`` or a module/callable ``[n, H] -> [n, V]`` (a module keeps ZeRO-3's
    parameter gathering working), targets ``[N]`` int64, ``temperature`` ``T`` of ``softmax(logits / T)``.
    Returns (logp ``[N]``, entropy ``[N]`` or None when ``entropy=False``), float32 (float64 for
    float64 inputs); the entropy never carries gradient.

    Each chunk's ``[chunk, V]`` logits exist only while that chunk is computed. Under autograd a
    chunk goes through :class:`FusedHeadLogprob` when :func:`head_weight` finds the weight, else
    through activation checkpointing of the head call (the backward recomputes it, one chunk at a
    time too). ``fused=False`` runs the unfused reference (checkpointed, entropy under autograd).
    Peak extra memory is O(chunk_size * V) instead of O(N * V).

    ``num_chunks`` (optional): call the head exactly ``max(num_chunks, ceil(N / chunk_size), 1)``
    times (and as often again in the backward), the calls past the real chunks on zero-row slices
    ``[0, H]``. They add no value and an exactly-zero gradient. Under ZeRO-3 every head call is a
    parameter all-gather: the caller passes the maximum over ranks so every rank makes the same calls.
    """
    fn = (lambda h: h @ head.t()) if isinstance(head, torch.Tensor) else head
    n = hidden.shape[0]
    if n == 0 and num_chunks is None:
        z = upcast(fn(hidden[:0])).sum(-1)  # keeps the graph connected (ZeRO-3 hooks still fire)
        return z, (z.detach() if entropy else None)
    params = [head] if isinstance(head, torch.Tensor) else list(getattr(head, "parameters", list)())
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    weight = head_weight(head) if grad and fused else None
    starts = list(range(0, n, chunk_size))
    starts += [n] * (max(num_chunks or 0, len(starts), 1) - len(starts))  # padding: empty chunks [n:n]
    lps, ents = [], []
    for start in starts:
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if not grad:
            lp, ent, _ = head_stats(fn(h), t, temperature, entropy)
        elif not fused:
            lp, ent = checkpoint(_reference_stats, h, fn, t, temperature, use_reentrant=False).unbind(-1)
        elif weight is not None:
            lp, ent = FusedHeadLogprob.apply(h, weight, t, temperature, fn, entropy)
        else:
            lp, ent = checkpoint(_checkpointed_stats, h, fn, t, temperature, entropy, use_reentrant=False)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(ents) if entropy else None)

"""The losses of SFT and (Lightning) OPD as pure functions of tensors.

Per-token math (``*_per_token``) is kept apart from the masked reduction
(:func:`token_weights` / :func:`aggregate`), so a micro-batch's loss can be normalised by
counts over the *global* batch and gradients accumulated across micro-batches and ranks add
up to the full-batch gradient. Everything is computed in float32 whatever the model dtype.

Notation: ``N`` = number of (flattened, selected) response-token positions, ``V`` = vocab,
``H`` = hidden size. ``log p(y_t)`` always means the log-prob of the *given* token ``y_t``
under the model, conditioned on the prompt and ``y_<t``.

OPD objective (arXiv 2604.13010): the student minimises the reverse KL to the teacher,
``KL(p_student || p_teacher) = E_{y~p_student}[log p_student(y) - log p_teacher(y)]``,
whose policy gradient is REINFORCE with the per-token advantage
``A_t = sg(log p_teacher(y_t) - log p_old(y_t))``. Lightning OPD uses rollouts sampled once
from the SFT policy and teacher log-probs precomputed once; standard OPD samples fresh.
"""

from __future__ import annotations

import torch

from lopd.train.lmhead import chunk_count, chunked_logprobs, upcast  # noqa: F401  (chunked LM head: lmhead)
from lopd.train.varlen import varlen_kwargs

_up = upcast

# --------------------------------------------------------------------------- log-probs


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reference (unchunked) per-token log-probs: ``log_softmax(logits / T)[..., targets]``.

    Args: logits ``[..., V]`` (any dtype), targets ``[...]`` int64. Returns float32 ``[...]``.
    Materialises ``[..., V]`` float32; use :func:`chunked_logprobs` on long sequences.
    """
    logits = _up(logits) / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def gather_selected(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``x[select]`` for ``x`` ``[B, L, ...]``: ``select`` a bool mask ``[B, L]``, or int64 flat
    (row-major) positions ``[N]`` (``MicroBatch.select_index``, computed on the host: an index
    gather needs no device sync, a boolean-mask gather does). Returns ``[N, ...]``."""
    if select.dtype == torch.bool:
        return x[select]
    return x.flatten(0, 1).index_select(0, select)


def model_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   targets: torch.Tensor, select: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   chunk_size: int = 1024, num_chunks: int | None = None,
                   temperature: float | None = None, entropy: bool = True,
                   fused: bool = True, cu_seqlens: torch.Tensor | None = None,
                   max_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``targets`` at the ``select``-ed positions of a causal LM.

    Args: input_ids / position_ids / targets / select ``[B, L]`` (select bool: positions whose
    next token is scored, or their flat positions ``[N]``: :func:`gather_selected`; packed rows
    restart ``position_ids`` at 0 per sequence, which transformers turns into a block-diagonal
    causal mask), optional attention_mask ``[B, L]``
    for padded rows; ``cu_seqlens`` (int32 ``[S+1]``) / ``max_seqlen``: the boundaries of a flat
    micro-batch (``B = 1``), passed to the attention function (:func:`lopd.train.varlen.varlen_kwargs`).
    Returns float32 ``[N]`` each (entropy None when ``entropy=False``), N =
    ``select.sum()``, in row-major order. Runs the decoder body, then :func:`chunked_logprobs` on
    the selected hidden states only (``num_chunks``: at least that many LM-head calls; ``fused``:
    False = the unfused reference; see there). ``temperature``: the logits are
    divided by it; None = the model's ``LOGIT_TEMPERATURE_ATTR`` attribute when set (online OPD sets
    it on the model it trains, so every forward through the training engine is tempered), else 1.
    """
    if temperature is None:
        temperature = float(getattr(model, LOGIT_TEMPERATURE_ATTR, None) or 1.0)
    out = model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **varlen_kwargs(cu_seqlens, max_seqlen))
    hidden = gather_selected(out.last_hidden_state, select)
    return chunked_logprobs(hidden, model.get_output_embeddings(), gather_selected(targets, select), chunk_size,
                            num_chunks,
                            temperature, entropy=entropy, fused=fused)


LOGIT_TEMPERATURE_ATTR = "lopd_logit_temperature"
"""Attribute of a causal LM module: the temperature :func:`model_logprobs` divides its logits by
(a plain Python attribute: never saved with the checkpoint)."""


# --------------------------------------------------------------------------- OPD


def opd_advantage(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """``A_t = sg(log p_teacher(y_t) - log p_old(y_t))``, float32, shape of the inputs ``[N]``.

    Its mean over tokens sampled from the student is minus a Monte-Carlo estimate of the
    per-token reverse KL ``KL(p_student || p_teacher)``; it is exactly 0 when the teacher is
    the student. No normalisation (paper: none).
    """
    return (_up(teacher_logprobs) - _up(old_logprobs)).detach()


def ppo_clip_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       clip_low: float = 0.2, clip_high: float = 0.2,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip policy loss per token against the policy at the start of the batch.

    ``r_t = exp(log p(y_t) - log p_old(y_t))``;
    ``l_t = w_t * max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))``.
    With ``r_t = 1`` (first update of a batch) ``grad l_t = -w_t A_t grad log p(y_t)``: the
    REINFORCE estimator of the reverse-KL gradient. Shapes: all ``[N]``; ``weights`` are
    optional detached importance weights. Returns (loss ``[N]`` float32, clipped ``[N]`` bool,
    true where the clipped branch is the active one).
    """
    logprobs, old_logprobs, advantages = _up(logprobs), _up(old_logprobs).detach(), _up(advantages)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    if weights is not None:
        loss = loss * _up(weights).detach()
    return loss, clipped_loss > unclipped


def truncated_importance_weights(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                                 cap: float = 2.0) -> torch.Tensor:
    """``w_t = min(p(y_t) / p_rollout(y_t), cap)``, detached, ``[N]`` float32.

    Corrects for the rollouts having been sampled by another policy (the SFT student, or the
    sampler's numerics); off by default as in the paper.
    """
    return torch.exp(_up(logprobs) - _up(rollout_logprobs)).clamp(max=cap).detach()


def kl_k3_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of ``KL(p_ref || p)`` on tokens sampled from ``p_ref``: ``[N]`` float32.

    ``k3_t = r_t - 1 - log r_t`` with ``r_t = p(y_t) / p_ref(y_t)``; non-negative, unbiased for
    ``KL(p_ref || p)`` when ``y ~ p_ref`` (the offline data, sampled by the SFT policy), and
    0 with zero gradient where ``p == p_ref``. Used for the KL-to-SFT metric and penalty.
    """
    log_r = _up(logprobs) - _up(ref_logprobs).detach()
    return torch.exp(log_r) - 1.0 - log_r


def opd_loss_per_token(logprobs: torch.Tensor, old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       rollout_logprobs: torch.Tensor | None = None, *, clip_low: float = 0.2,
                       clip_high: float = 0.2, iw_cap: float | None = None,
                       kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full OPD per-token loss: PPO-clip on ``A_t`` (+ optional IW, + optional KL to SFT).

    All inputs ``[N]``. ``rollout_logprobs`` (the SFT sampler's) feed the truncated importance
    weights (``iw_cap`` not None) and the KL-to-reference term (``kl_coef > 0``).
    Returns (loss ``[N]``, per-token stats ``{advantage, clipped, kl_ref}``), all ``[N]``.
    """
    adv = opd_advantage(teacher_logprobs, old_logprobs)
    w = None
    if iw_cap is not None and rollout_logprobs is not None:
        w = truncated_importance_weights(logprobs, rollout_logprobs, iw_cap)
    loss, clipped = ppo_clip_per_token(logprobs, old_logprobs, adv, clip_low, clip_high, w)
    ref = rollout_logprobs if rollout_logprobs is not None else old_logprobs
    kl = kl_k3_per_token(logprobs, ref)
    if kl_coef > 0.0:
        loss = loss + kl_coef * kl
    return loss, {"advantage": adv, "clipped": _up(clipped), "kl_ref": kl.detach()}


def sft_loss_per_token(logprobs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per target token: ``-log p(y_t)``, ``[N]`` float32."""
    return -_up(logprobs)


# --------------------------------------------------------------------------- reduction


def token_weights(mask: torch.Tensor, seq_ids: torch.Tensor, mode: str = "token-mean",
                  num_tokens: float | None = None, num_seqs: float | None = None) -> torch.Tensor:
    """Weights ``w_t`` such that ``sum_t w_t l_t`` is the aggregated loss; ``[N]`` float32.

    - ``token-mean``: ``w_t = m_t / num_tokens`` (all unmasked tokens of the batch count equally);
    - ``sample-mean``: ``w_t = m_t / (len(seq(t)) * num_seqs)`` (mean per sequence, then over
      sequences; ``len`` counts the unmasked tokens of the sequence within these inputs).

    ``num_tokens`` / ``num_seqs`` default to the counts in these inputs; pass the *global*
    batch's counts so micro-batch losses sum to the batch loss. Masked or all-masked inputs
    get weight 0 (never a division by zero). mask ``[N]`` (bool/float), seq_ids ``[N]`` int.
    """
    m = _up(mask)
    if mode == "token-mean":
        denom = float(num_tokens) if num_tokens is not None else float(m.sum())
        return m / max(denom, 1.0)
    if mode != "sample-mean":
        raise ValueError(f"unknown loss aggregation {mode!r} (token-mean | sample-mean)")
    if m.numel() == 0:
        return m
    _, inverse = torch.unique(seq_ids, return_inverse=True)
    lens = torch.zeros(int(inverse.max()) + 1, dtype=m.dtype, device=m.device).index_add_(0, inverse, m)
    n_seqs = float(num_seqs) if num_seqs is not None else float((lens > 0).sum())
    return m / (lens[inverse].clamp(min=1.0) * max(n_seqs, 1.0))


def aggregate(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t l_t`` (scalar float32); 0 (not NaN) when every weight is 0, even if masked
    positions hold inf/NaN."""
    w = _up(weights)
    return torch.where(w != 0, _up(per_token) * w, torch.zeros_like(w)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 when nothing is selected. Shapes ``[N]``; returns scalar."""
    return aggregate(x, token_weights(mask, torch.zeros_like(mask, dtype=torch.long)))


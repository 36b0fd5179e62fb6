"""Gradient discrepancy between offline and online OPD at the current weights.

The paper bounds the gap between the Lightning OPD gradient (rollouts sampled once by the SFT
policy, teacher log-probs precomputed) and the standard OPD gradient (rollouts sampled by the
current policy). This measures it: both gradients of the first-update OPD loss
``mean_t -A_t log p(y_t)`` (``A_t = log p_teacher - log p_current``) on the same prompts, their
cosine similarity and norm ratio. Plain autograd on an HF model holding the current weights.
"""

from __future__ import annotations

import torch

from lopd.recipe import OpdConfig
from lopd.train import losses as L
from lopd.train.data import OpdSample
from lopd.train.engine import device
from lopd.train.packing import pack


def opd_gradient(model: torch.nn.Module, samples: list[OpdSample], cfg: OpdConfig) -> torch.Tensor:
    """Flat gradient ``[P]`` (float32) of the OPD loss on ``samples`` with ``p_old`` = current weights."""
    model.zero_grad(set_to_none=True)
    mbs = [mb.to(device()) for mb in pack([s.to_seq(i) for i, s in enumerate(samples)],
                                           cfg.train.micro_batch_tokens)]
    n_t, n_s = sum(mb.num_targets for mb in mbs), len(samples)
    iw = cfg.importance_weights
    for mb in mbs:
        lp, _ = L.model_logprobs(model, mb.input_ids, mb.position_ids, mb.targets, mb.select, mb.attention_mask,
                                 cfg.logprob_chunk_tokens)
        per_tok, _ = L.opd_loss_per_token(lp, lp.detach(), mb.extras["teacher_logprobs"],
                                          mb.extras["rollout_logprobs"], clip_low=cfg.clip_low,
                                          clip_high=cfg.clip_high, iw_cap=iw.cap if iw.enabled else None,
                                          kl_coef=cfg.kl_coef)
        L.aggregate(per_tok, L.token_weights(torch.ones_like(lp), mb.seq_index, cfg.loss_agg, n_t, n_s)).backward()
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                   for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def discrepancy(offline: torch.Tensor, online: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and norm ratio ``|g_offline| / |g_online|`` of two flat gradients."""
    offline, online = offline.double(), online.double()  # fp32 dot products over ~1e9 entries drift
    n_off, n_on = float(offline.norm()), float(online.norm())
    cos = float(offline @ online) / max(n_off * n_on, 1e-30)
    return {"grad_cosine": cos, "grad_norm_ratio": n_off / max(n_on, 1e-30), "offline_grad_norm": n_off,
            "online_grad_norm": n_on}


class GradientDiagnostic:
    """Offline-mode hook: every K steps, the discrepancy between this step's offline gradient and
    the online gradient on fresh current-policy rollouts of the same prompts (this rank's share)."""

    def __init__(self, run, student):
        from types import SimpleNamespace

        from transformers import AutoModelForCausalLM

        from lopd.train.online import OnlineSource

        self.run, self.cfg = run, run.section
        self.source = OnlineSource.from_run(run, student)
        self.source.attach(run)
        self.model = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(student.path).to(device()))

    def measure(self, step: int, samples: list[OpdSample]) -> dict[str, float]:
        from lopd.train.online import gather_weights, push_weights

        weights = gather_weights(self.run.engine)
        push_weights(self.source.sampler, weights)
        push_weights(self.model, weights)
        online = self.source.rollouts([s.prompt_id for s in samples], [s.prompt_ids.tolist() for s in samples],
                                      step, sync=False)
        g_off = opd_gradient(self.model.model, samples, self.cfg)
        g_on = opd_gradient(self.model.model, online, self.cfg)
        return discrepancy(g_off, g_on)

    def close(self) -> None:
        self.source.close()

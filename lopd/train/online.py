"""Standard (online) OPD: fresh rollouts of the current student each step, scored by a live teacher.

Per step: push the trainer's current weights into the sampler (an inference backend behind
:class:`lopd.inference.base.Backend`; vLLM reloads them layer by layer into its live engine,
as slime and verl do; the hf backend copies them into its parameters) → sample
``sampling.n`` rollouts per prompt of this rank's share of the step's ``global_batch / n``
prompts (``train.global_batch`` counts sequences) → the teacher scores every response token
(in-process with the chunked log-prob function, or a vLLM server's ``prompt_logprobs``: raw,
temperature-1 log-probs) → the same :func:`lopd.train.opd.opd_step` as offline mode.

The sampler returns the log-probs of the distribution it sampled from (``processed`` when the
sampling is tempered), and the trained student's logits are divided by ``train_temperature`` in
every training forward, so with ``train_temperature`` equal to the sampling temperature and top-p
1 the stored rollout log-probs and the trainer's are of the same distribution (importance
weights are refused otherwise). Rollouts cut at ``max_tokens`` are kept and counted per step
(``truncated``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lopd import LopdError, stage
from lopd.data.chat import check_same_vocab, encode_prompt
from lopd.data.prompts import Prompt, load_prompts
from lopd.layout import stage_prefix
from lopd.lineage import check_teacher_consistency
from lopd.manifest import InputRef
from lopd.recipe import SamplingConfig
from lopd.train.data import OpdSample, global_batch_indices, rank_share
from lopd.train.losses import LOGIT_TEMPERATURE_ATTR
from lopd.train.opd import split_minis
from lopd.train.step import all_reduce
from lopd.train.teachers import InProcessTeacher, ServerTeacher


class OnlineError(LopdError):
    """Online OPD cannot run as configured (no prompts, teacher server errors...)."""


# --------------------------------------------------------------------------- weights


def gather_weights(engine) -> dict[str, torch.Tensor]:
    """Full weights of the trained HF model by name (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.lm.named_parameters():
        v = safe_get_full_fp32_param(p)
        out[name] = (v if v is not None else p.data).detach()
    return out


def push_weights(backend, weights: dict[str, torch.Tensor]) -> None:
    """Load the trainer's weights into a live sampler: the vLLM engine through its layerwise
    reload (:meth:`lopd.inference.vllm_backend.VLLMBackend.update_weights`, prefix cache reset),
    the hf backend by copying into its parameters."""
    update = getattr(backend, "update_weights", None)
    if update is not None:
        try:
            update(weights)
        except Exception as e:  # vLLM re-raises a worker's error as a bare Exception across processes
            why = (str(e).splitlines() or [""])[0]
            why = why if len(why) <= 300 else why[:300] + "…"
            raise OnlineError(f"opd.online.inference: cannot load the trainer's weights into the live "
                              f"{type(backend).__name__}: {type(e).__name__}: {why}") from None
        return
    model = getattr(backend, "model", None)
    if model is None:
        raise OnlineError(f"cannot push weights into {type(backend).__name__} (no update_weights or .model)")
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            sd[k].copy_(v.to(sd[k].dtype))


# --------------------------------------------------------------------------- source


def check_online_sampling(cfg) -> None:
    """One-line errors for online settings that cannot be honoured: a global batch that is not
    whole prompts' samples, and importance weights whose two log-probs are of different
    distributions (the sampler's at its temperature / top-p, the trainer's at train_temperature)."""
    sp, n = cfg.online.sampling, cfg.online.sampling.n
    if cfg.train.global_batch % n:
        raise OnlineError(f"opd.train.global_batch: {cfg.train.global_batch} sequences is not a multiple of "
                          f"opd.online.sampling.n={n} samples per prompt")
    train_t = cfg.online.train_temperature or 1.0
    if cfg.importance_weights.enabled and (sp.top_p < 1.0 or sp.temperature != train_t):
        raise OnlineError(
            f"opd.importance_weights.enabled: online rollouts sampled at opd.online.sampling.temperature="
            f"{sp.temperature:g}, top_p={sp.top_p:g} cannot be compared with the trainer's log-probs at "
            f"opd.online.train_temperature={train_t:g}; use top_p: 1 and equal temperatures, or disable them")



class OnlineSource:
    """Fresh rollouts per step for :func:`lopd.train.opd.opd_step` (mirrors
    :class:`lopd.train.offline.OfflineSource`)."""

    plot_keys: list[str] = []
    summary: dict = {}

    def __init__(self, run, student, teacher, prompts: list[Prompt], lineage: dict, inputs: dict):
        self.run, self.student, self.teacher_model = run, student, teacher
        self.prompts, self.lineage, self.inputs = prompts, lineage, inputs
        self.cfg = run.section.online
        self.sampler = self.teacher = None
        self.timings: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    @classmethod
    def from_run(cls, run, student=None) -> OnlineSource:
        """Resolve the student (SFT checkpoint), the teacher (consistency-checked) and the prompts;
        with ``student`` given (the offline gradient diagnostic) no prompts are needed."""
        recipe, cfg = run.recipe, run.section
        ref = cfg.student or run.store.url(stage_prefix(recipe.run_id, "sft"))
        student = student or stage.resolve_model(ref, "opd.student")
        teacher = stage.resolve_model(recipe.models.teacher, "models.teacher.uri")
        consistency = check_teacher_consistency(student.lineage.get("teacher_fingerprint"), teacher.fingerprint,
                                                recipe.allow_inconsistent_teacher)
        src = cfg.online.prompts or (recipe.precompute.prompts if recipe.precompute else None)
        if cfg.mode == "offline":
            return cls(run, student, teacher, [], {}, {})
        if cfg.kl_coef > 0:
            raise OnlineError("opd.kl_coef: the KL-to-SFT penalty needs the SFT policy's log-probs of fresh "
                              "rollouts, which online mode does not compute; use kl_coef: 0 online")
        check_online_sampling(cfg)
        if not src:
            raise OnlineError("opd.online.prompts: online mode needs prompts (or precompute.prompts)")
        prompts = sorted(load_prompts(src), key=lambda p: p.prompt_id)
        inputs = {"student": student.input_ref(), "teacher": teacher.input_ref(), "prompts": InputRef(uri=src)}
        lineage = {**consistency, "student_fingerprint": student.fingerprint, "mode": "online"}
        return cls(run, student, teacher, prompts, lineage, inputs)

    def attach(self, run) -> None:
        """Start the sampler and the teacher (after the engine exists: the sampler gets its weights)."""
        from transformers import AutoTokenizer

        from lopd.inference import load_backend, sampler_logprobs_mode

        if run.section.mode == "online" and self.cfg.train_temperature is not None:
            setattr(run.engine.module.lm, LOGIT_TEMPERATURE_ATTR, self.cfg.train_temperature)
        self.tokenizer = AutoTokenizer.from_pretrained(self.student.path)
        check_same_vocab(AutoTokenizer.from_pretrained(self.teacher_model.path), self.tokenizer, "teacher",
                         "student")
        self.sampler = load_backend(self.student.path, self.cfg.inference, seed=self.cfg.sampling.seed,
                                    logprobs_mode=sampler_logprobs_mode(self.cfg.sampling))
        self.teacher = (ServerTeacher(self.cfg.teacher_url) if self.cfg.teacher_url
                        else InProcessTeacher(self.teacher_model.path, run.section.logprob_chunk_tokens,
                                              run.section.train.micro_batch_tokens))

    def rollouts(self, keys: list[str], ids: list[list[int]], step: int, sync: bool = True,
                 n: int = 1) -> list[OpdSample]:
        """Current-policy rollouts (``n`` per tokenised prompt, ``sample_index`` 0..n-1; empty
        responses dropped) with teacher log-probs."""
        t0 = time.perf_counter()
        if sync:
            push_weights(self.sampler, gather_weights(self.run.engine))
        t1 = time.perf_counter()
        sp: SamplingConfig = self.cfg.sampling.model_copy(update={"n": n})
        seeds = [stage.prompt_seed(sp.seed * 1_000_003 + step, k) for k in keys]
        comps = self.sampler.generate(ids, sp, seeds) if ids else []
        keep = [((k, j), i, c) for k, i, cs in zip(keys, ids, comps, strict=True) for j, c in enumerate(cs)
                if c.token_ids]
        t2 = time.perf_counter()
        scores = self.teacher.score([i for _, i, _ in keep], [c.token_ids for _, _, c in keep]) if keep else []
        self.timings = {"sync_s": t1 - t0, "sample_s": t2 - t1, "score_s": time.perf_counter() - t2}
        self.counts = {"rollouts": float(len(keep)),
                       "truncated": float(sum(c.finish_reason == "length" for _, _, c in keep))}
        return [OpdSample(k, j, np.asarray(i, np.int64), np.asarray(c.token_ids, np.int64),
                          np.asarray(sc, np.float32), np.asarray(c.logprobs, np.float32), c.finish_reason)
                for ((k, j), i, c), sc in zip(keep, scores, strict=True)]

    def step_prompts(self, step: int) -> list[Prompt]:
        t = self.run.section.train
        idx = global_batch_indices(len(self.prompts), step, t.global_batch // self.cfg.sampling.n, t.seed)
        return rank_share([self.prompts[i] for i in idx], self.run.rank, self.run.world)

    def batch(self, step: int) -> list[OpdSample]:
        prompts = self.step_prompts(step)
        sp = self.cfg.sampling
        ids = [encode_prompt(self.tokenizer, p.messages, sp.enable_thinking) for p in prompts]
        return self.rollouts([p.prompt_id for p in prompts], ids, step, n=sp.n)

    def minibatches(self, step: int) -> list[list[OpdSample]]:
        """Fresh rollouts of this rank's share of step ``step``'s prompts, split into the PPO
        mini-batches locally (each rank sampled its own share)."""
        return split_minis(self.batch(step), self.run.section.mini_batches, 0, 1)

    def before_step(self, step: int, minis: list[list[OpdSample]]) -> dict[str, float]:
        """Metrics measured before the update: the sampling and scoring times of this batch (this
        rank's) and its rollouts and truncated rollouts (all ranks)."""
        keys = ("rollouts", "truncated")
        return {**self.timings, **dict(zip(keys, all_reduce([self.counts.get(k, 0.0) for k in keys]), strict=True))}

    def close(self) -> None:
        for x in (self.sampler, self.teacher):
            if x is not None:
                x.close()

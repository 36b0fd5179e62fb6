"""The opd stage's recipe section: offline (Lightning) or online OPD, its loss and its batches.

One pydantic model per component, a docstring per field; defaults are the paper's (see
:mod:`lopd.sections`, whose shared models these build on).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lopd.sections import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_TOKENS,
    InferenceConfig,
    ResourcesConfig,
    SamplingConfig,
    Section,
    sampling_engine,
)
from lopd.train_config import OptimConfig, TrainConfig


class ImportanceWeightsConfig(Section):
    """Truncated importance weights from the stored rollout log-probs."""

    enabled: bool = False
    """Weight each token by min(p_current / p_rollout, cap) (off in the paper)."""
    cap: float = Field(2.0, gt=0.0)
    """Truncation cap of the weight."""


class OnlineConfig(Section):
    """Standard (online) OPD: fresh rollouts each step, scored by a live teacher."""

    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=4096)
    """Student sampling for fresh rollouts; ``n`` samples per prompt (``train.global_batch`` counts
    sequences, so a step takes ``global_batch / n`` prompts; paper: 64 prompts × 4 at T=0.8)."""
    train_temperature: float | None = Field(None, gt=0.0)
    """Temperature the trained student's logits are divided by in every training forward (log p_old
    and log p); None = 1, the model's own distribution (paper's code: the sampling temperature)."""
    teacher_url: str | None = None
    """OpenAI-compatible vLLM server of the teacher; None scores in-process."""
    prompts: str | None = None
    """OPD prompts (JSONL or parquet; path or store URI); None = ``precompute.prompts``."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for student sampling."""

    @field_validator("inference")
    @classmethod
    def _samples(cls, v: InferenceConfig) -> InferenceConfig:
        return sampling_engine(v)


class OpdConfig(Section):
    """Stage ``opd``: policy-gradient distillation with advantage log p_teacher − log p_student."""

    mode: Literal["offline", "online"] = "offline"
    """offline = Lightning OPD on the precomputed rollouts; online = standard OPD."""
    student: str | None = None
    """The SFT checkpoint to train (store URI or directory); None = the model that sampled the
    precomputed rollouts (offline) or this run's ``sft`` stage output (online)."""
    rollouts: str | None = None
    """Offline mode: the precompute output to train on, as a key prefix in the recipe's store
    (``runs/<run>/precompute``); None = this run's precompute stage. Lets several OPD variants
    (``lopd repro``) share one set of precomputed rollouts."""
    rounds: int = Field(1, ge=1, le=64)
    """Lightning rounds (offline mode; 1 = the paper, at most 64). The precompute prompts are split
    into ``rounds`` contiguous, disjoint parts; round r: the student as round r-1 left it (round 1:
    the SFT student) samples part r, the same teacher scores it (stage ``precompute-r<r>``), then
    OPD makes updates ``(r-1)·steps/R .. r·steps/R`` on it (stage ``opd-r<r>``), continuing round
    r-1's weights, Adam state and learning-rate schedule. Sampled and scored tokens are those of one
    round; the cost is R-1 more stage start-ups (:mod:`lopd.rounds`)."""
    logprob_chunk_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)
    """Positions per LM-head chunk when computing log-probs (bounds the fp32 [T, vocab] logits; at
    most 2^20)."""
    grad_discrepancy_every: int = Field(0, ge=0, le=MAX_STEPS)
    """Every this many steps (at most 10^7), log the cosine and norm ratio between the offline gradient (this
    step's precomputed rollouts) and the online gradient (fresh rollouts of the same prompts)
    at the current weights; 0 = never. Offline mode only; it starts a sampler and a teacher."""
    optim: OptimConfig = OptimConfig()
    """Optimizer (paper: lr 2e-6 constant, betas (0.9, 0.98), wd 0.1, clip 1.0)."""
    train: TrainConfig = TrainConfig()
    """Steps and batching (paper: ~150 steps of 256 sequences)."""
    clip_low: float = Field(0.2, ge=0.0)
    """PPO ratio clip below 1."""
    clip_high: float = Field(0.2, ge=0.0)
    """PPO ratio clip above 1."""
    mini_batches: int = Field(1, ge=1, le=MAX_BATCH)
    """Optimizer updates per global batch (PPO mini-batches; at most 2^20). ``log p_old`` is computed once at the
    start of the batch, so updates after the first are off-policy and the clip acts; with 1 the
    ratio is exactly 1 and the loss is plain REINFORCE on A_t."""
    objective: Literal["sampled", "topk"] = "sampled"
    """sampled: the paper's policy gradient on the sampled tokens, advantage log p_teacher(y_t) −
    log p_old(y_t), PPO-clipped. topk: the exact reverse KL(student || teacher) on the teacher's
    stored top-k support plus the sampled token, with the rest pooled into one tail bin
    (:mod:`lopd.train.topk`: a lower bound of the full reverse KL, exact when k = vocabulary);
    needs precompute data with ``precompute.teacher_topk > 0``; offline mode only, no importance weights."""
    loss_agg: Literal["token-mean", "sample-mean"] = "token-mean"
    """Aggregate per-token losses over all tokens, or per sequence then over sequences."""
    importance_weights: ImportanceWeightsConfig = ImportanceWeightsConfig()
    """Truncated importance weights (off by default)."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Coefficient of a KL-to-reference (SFT policy) penalty; 0 disables it."""
    online: OnlineConfig = OnlineConfig()
    """Settings used when mode is online."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""

    @model_validator(mode="after")
    def _rounds(self) -> OpdConfig:
        if self.rounds > 1 and self.mode != "offline":
            raise ValueError("rounds: Lightning rounds are offline OPD (online OPD samples every step already)")
        if self.rounds > 1 and self.rollouts is not None:
            raise ValueError("rounds: each round trains on its own precompute round; rollouts must be unset")
        if self.rounds > self.train.steps:
            raise ValueError(f"rounds: {self.rounds} rounds need at least as many train.steps "
                             f"(got {self.train.steps})")
        return self

    @model_validator(mode="after")
    def _topk_objective(self) -> OpdConfig:
        if self.objective == "topk" and self.mode == "online":
            raise ValueError("objective topk needs the teacher's stored top-k (offline mode); online OPD scores "
                             "only the sampled tokens")
        if self.objective == "topk" and self.importance_weights.enabled:
            raise ValueError("objective topk takes the expectation over the next token exactly; importance "
                             "weights of the sampled token do not apply (disable importance_weights)")
        return self

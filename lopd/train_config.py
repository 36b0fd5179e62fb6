"""The training sections: the optimizer, what SFT and OPD share (:class:`TrainConfig`), and the
``sft`` stage's section. One pydantic model per component, a docstring per field (see
:mod:`lopd.sections`, whose base and bounds these build on)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lopd.sections import MAX_BATCH, MAX_STEPS, MAX_TOKENS, ResourcesConfig, Section


class OptimConfig(Section):
    """Optimizer and schedule."""

    lr: float = Field(2e-6, gt=0.0)
    """Peak learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """LR schedule after warm-up."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of steps of linear warm-up."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Cosine floor as a fraction of ``lr``."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay (of the linear and embedding weights; see ``decay_norms_and_biases``)."""
    decay_norms_and_biases: bool = False
    """Also decay norm weights and biases. Off by default: they are kept out of weight decay, as
    in the paper's code (Megatron's default parameter groups exclude biases and 1-D weights)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class TrainConfig(Section):
    """What SFT and OPD share: steps, batching, DeepSpeed, checkpoints."""

    steps: int = Field(150, gt=0, le=MAX_STEPS)
    """Optimizer steps (at most 10^7)."""
    global_batch: int = Field(256, gt=0, le=MAX_BATCH)
    """Sequences per optimizer step, across all ranks (at most 2^20)."""
    micro_batch_tokens: int = Field(16384, gt=0, le=4 * MAX_TOKENS)
    """Token budget of one micro-batch on one rank (sequences are packed or grouped under it; at
    most 2^22)."""
    max_seq_len: int = Field(8192, gt=0, le=MAX_TOKENS)
    """Longest prompt+response kept; longer samples are truncated (SFT) or skipped (OPD);
    at most 2^20."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: Literal[True, False, "selective"] = True
    """Recompute activations in the backward to save memory (:mod:`lopd.train.layers`): true = each
    decoder layer keeps only its input and reruns its whole forward; selective = it also keeps the
    outputs of its matmuls and attention and reruns only the rest (norms, RoPE, activation
    functions), more memory for less recomputation; false = keep everything."""
    compile: Literal[False, True, "inductor", "aot_eager"] = False
    """``torch.compile`` each decoder layer: true or inductor = generated kernels (Triton on GPU) that
    fuse the norms, RoPE and SwiGLU; aot_eager = traced but run by the eager kernels (checks that a
    model traces). New micro-batch lengths compile once more, then lengths are dynamic. ZeRO 0-2 and
    full or no checkpointing only (ZeRO-3's parameter hooks and the selective policy cannot see
    inside compiled kernels)."""
    grad_accum_fp32: bool = True
    """With bf16 weights at ZeRO 1-3, add up a step's gradients over its micro-batches in fp32
    (DeepSpeed's ``data_types.grad_accum_dtype``; ZeRO-1 then runs DeepSpeed's BF16 optimizer);
    false = in bf16, DeepSpeed's default. ZeRO-0 accumulates in the weights' dtype (DeepSpeed has no
    bf16 weights with fp32 accumulation there); fp32 weights accumulate in fp32 either way."""
    overlap_comm: bool | None = None
    """ZeRO 1-3: reduce gradient buckets while the backward still runs (DeepSpeed's
    ``overlap_comm``, more bucket memory); None = DeepSpeed's default (off at ZeRO-1/2, on at ZeRO-3)."""
    attention: Literal["sdpa", "varlen"] = "sdpa"
    """sdpa = transformers' sdpa on packed rows of a common width (a block-diagonal mask from the
    restarting positions); varlen = flat packing, one row per micro-batch without filler, attention
    per sequence through ``torch.nn.attention.varlen.varlen_attn`` on CUDA (FlashAttention-2's varlen
    when ``flash_attn`` is importable), the boundaries computed on the host; on CPU an exact
    per-sequence sdpa loop (``lopd.train.varlen``). Default sdpa until varlen is measured on a GPU."""
    checkpoint_every: int = Field(50, gt=0, le=MAX_STEPS)
    """Save a resumable checkpoint every this many steps (at most 10^7)."""
    seed: int = 0
    """Data order and init seed."""
    log_every: int = Field(1, gt=0, le=MAX_STEPS)
    """Write metrics every this many steps (at most 10^7)."""

    @model_validator(mode="after")
    def _compile_where_it_works(self) -> TrainConfig:
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile: not supported with zero_stage 3 (its parameter hooks run inside "
                             "each layer); use zero_stage 0-2 or compile: false")
        if self.compile and self.gradient_checkpointing == "selective":
            raise ValueError("compile: not supported with gradient_checkpointing: selective (the policy "
                             "cannot see inside compiled kernels); use gradient_checkpointing: true")
        return self


class SftConfig(Section):
    """Stage ``sft``: full fine-tune of the student base on the teacher's SFT data."""

    optim: OptimConfig = OptimConfig(lr=8e-5, schedule="cosine", warmup_ratio=0.1, betas=(0.9, 0.95))
    """Optimizer (paper: lr 8e-5, cosine, 10% warm-up)."""
    train: TrainConfig = TrainConfig(steps=3000, global_batch=128)
    """Steps and batching (paper: 3000 steps)."""
    packing: bool = True
    """Pack sequences into micro-batches without cross-sequence attention."""
    data: str | None = None
    """The sft-data output to train on, as a key prefix in the recipe's store
    (``runs/<run>/sft-data``); None = this run's sft-data stage. Lets ``lopd repro``'s SFT control
    row continue training on the study's SFT data."""
    truncated: Literal["drop", "mask"] = "drop"
    """Teacher answers that stopped on the length limit (``finish_reason: length``): drop them, or
    mask = train on the partial answer with no end-of-turn target and nothing after the cut (the
    manifest's metrics count ``truncated_dropped`` / ``truncated_masked``)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""

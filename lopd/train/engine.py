"""DeepSpeed setup from the recipe, and the micro-batch accumulation step shared by SFT and OPD.

- ZeRO stage 0-3 from ``train.zero_stage``; the dtype from ``models.student.dtype``, auto = bf16
  on GPU, fp32 on CPU (:func:`train_dtype`; a model loaded in bf16 trains in bf16 anywhere,
  DeepSpeed keeping fp32 master weights); NCCL on GPU, gloo on CPU. In bf16 at ZeRO 1-3 a step's
  gradients add up in fp32 (``train.grad_accum_fp32``); ``train.overlap_comm`` as given.
- The optimizer is torch's AdamW (the recipe's betas / eps / weight decay) handed to DeepSpeed, with
  norm weights and biases in a group without weight decay unless ``optim.decay_norms_and_biases``
  (:func:`param_groups`); the learning rate is set by :func:`lr_at` before every optimizer step (so a resumed run
  continues the schedule exactly), gradient clipping is DeepSpeed's ``gradient_clipping``.
- Gradient accumulation is caller-driven (:mod:`lopd.train.step`): the same passes on every
  rank, the accumulation boundary set explicitly, losses normalised by *global* counts.
"""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist

from lopd.recipe import OptimConfig, TrainConfig
from lopd.train.cpu_ops import load_shm_comm_op
from lopd.train.layers import prepare_layers
from lopd.train.losses import model_logprobs
from lopd.train.packing import MicroBatch
from lopd.train.topk import model_topk_kl


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (env:// from torchrun, or a 1-rank group
    when launched as a plain process); returns (rank, world size)."""
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        import deepspeed

        if not on_gpu():
            load_shm_comm_op()  # before DeepSpeed loads it behind a lock file a kill can leave
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False)
    if on_gpu():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def train_dtype(spec: str = "auto") -> torch.dtype:
    """The dtype the student trains in, from ``models.student.dtype``: auto = bf16 on GPU, fp32
    on CPU; bfloat16 / float32 as given, on either (float16 is refused by the recipe)."""
    if spec == "auto":
        return torch.bfloat16 if on_gpu() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec]


def ds_config(train: TrainConfig, optim: OptimConfig, bf16: bool | None = None) -> dict:
    """The DeepSpeed config dict for this recipe section; ``bf16`` defaults to :func:`on_gpu`."""
    zero: dict = {"stage": train.zero_stage}
    if train.overlap_comm is not None and train.zero_stage > 0:
        zero["overlap_comm"] = train.overlap_comm
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    bf16 = on_gpu() if bf16 is None else bf16
    extra = {}
    if bf16 and train.grad_accum_fp32 and train.zero_stage > 0:  # ZeRO-0 has no bf16 + fp32 mix
        extra["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # we set the boundary ourselves (variable micro-batch count)
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at every forward
        # and step from the third step on, draining the launch queue; lopd times steps itself
        "timers": {"throughput": {"enabled": False}},
        **extra,
    }


class LogprobModel(torch.nn.Module):
    """The module DeepSpeed wraps: a causal LM (``.lm``) whose forward returns per-target
    log-probs and entropies (chunked LM head, :func:`lopd.train.losses.model_logprobs`).
    Going through ``engine(...)`` keeps DeepSpeed's per-forward bookkeeping (ZeRO-3 needs it
    to accumulate gradients across micro-batches). ``cu_seqlens`` (int32 ``[S+1]``) / ``max_seqlen``:
    the boundaries of a flat micro-batch (``[1, T]`` inputs), for the varlen attention.
    ``fused_head`` (attribute, default True): the fused LM-head backward; False runs the unfused
    reference (:func:`lopd.train.lmhead.chunked_logprobs`)."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm, self.chunk_size, self.fused_head = lm, chunk_size, True

    def forward(self, input_ids, position_ids, targets, select, attention_mask=None, num_chunks=None,
                entropy=True, topk=None, cu_seqlens=None, max_seqlen=None):
        if attention_mask is None and input_ids.shape[0] > 1 and "flash" in str(
                getattr(self.lm.config, "_attn_implementation", "")):
            # transformers' FlashAttention path detects packed sequences (varlen) only in one row;
            # every packed row starts a sequence at position 0, so one flattened row is exact
            input_ids, position_ids, targets = (t.reshape(1, -1) for t in (input_ids, position_ids, targets))
            if select.dtype == torch.bool:  # flat positions stay what they are
                select = select.reshape(1, -1)
        if topk is not None:  # (teacher_logprobs [N], topk_ids [N, k], topk_logprobs [N, k]) -> (loss, logp, entropy)
            return model_topk_kl(self.lm, input_ids, position_ids, targets, select, *topk, attention_mask,
                                 self.chunk_size, num_chunks, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return model_logprobs(self.lm, input_ids, position_ids, targets, select, attention_mask, self.chunk_size,
                              num_chunks, entropy=entropy, fused=self.fused_head, cu_seqlens=cu_seqlens,
                              max_seqlen=max_seqlen)


def forward_logprobs(engine, mb: MicroBatch, num_chunks: int | None = None,
                     entropy: bool = True, topk=None) -> tuple[torch.Tensor, ...]:
    """(log p ``[N]``, entropy ``[N]`` or None when ``entropy=False``) of a micro-batch's targets
    through the engine; ``num_chunks``: at least that many LM-head calls
    (:func:`lopd.train.losses.chunked_logprobs`). With ``topk`` (:func:`lopd.train.topk.topk_inputs`):
    (top-k reverse KL ``[N]``, log p, entropy), :func:`lopd.train.topk.model_topk_kl`. A flat
    micro-batch's boundaries (``cu_seqlens``, ``max_seqlen``) go to the attention function."""
    return engine(mb.input_ids, mb.position_ids, mb.targets, mb.select_index, mb.attention_mask, num_chunks=num_chunks,
                  entropy=entropy, topk=topk, cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)


def _no_decay(module: torch.nn.Module, name: str) -> bool:
    return name == "bias" or "norm" in type(module).__name__.lower()


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW parameter groups: weights decayed by ``optim.weight_decay``, and norm weights (any
    module whose class name contains "Norm": RMSNorm / LayerNorm, Qwen3's ``q_norm`` / ``k_norm``)
    and biases in a group with no decay; one group decaying everything when
    ``optim.decay_norms_and_biases``. Each parameter once (tied weights included), empty groups dropped."""
    owner = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, name))
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (keep if not optim.decay_norms_and_biases and _no_decay(*owner[id(p)]) else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_engine(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, chunk_size: int = 1024):
    """Wrap ``model`` (an HF causal LM) in a DeepSpeed engine with AdamW (:func:`param_groups`);
    bf16 when the model's weights are bf16, else fp32; its decoder layers checkpointed and compiled
    per the recipe (:func:`lopd.train.layers.prepare_layers`). Returns the engine (``engine.module.lm`` is
    the HF model)."""
    import deepspeed

    prepare_layers(model, train.gradient_checkpointing, train.compile)
    model.train()  # from_pretrained gives eval mode, where HF layers skip gradient checkpointing (dropout is 0)
    model.config.use_cache = False
    opt = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    engine, *_ = deepspeed.initialize(model=LogprobModel(model, chunk_size), optimizer=opt,
                                      config=ds_config(train, optim, bf16))
    return engine


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``ceil(warmup_ratio * total)`` steps from lr/warmup, then constant or cosine to ``min_lr_ratio * lr``."""
    warm = math.ceil(optim.warmup_ratio * total_steps)
    if step < warm:
        return optim.lr * (step + 1) / warm
    if optim.schedule == "constant":
        return optim.lr
    progress = (step - warm) / max(1, total_steps - warm)
    floor = optim.min_lr_ratio
    return optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(engine, lr: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = lr

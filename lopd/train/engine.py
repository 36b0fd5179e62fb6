"""DeepSpeed setup from the recipe, and the micro-batch accumulation step shared by SFT and OPD.

- ZeRO stage 0-3 from ``train.zero_stage``; the dtype from ``models.student.dtype``, auto = bf16
  on GPU, fp32 on CPU (:func:`train_dtype`; a model loaded in bf16 trains in bf16 anywhere,
  DeepSpeed keeping fp32 master weights); NCCL on GPU, gloo on CPU.
- The optimizer is torch's AdamW (the recipe's betas / eps / weight decay) handed to DeepSpeed, with
  norm weights and biases in a group without weight decay unless ``optim.decay_norms_and_biases``
  (:func:`param_groups`); the learning rate is set by :func:`lr_at` before every optimizer step (so a resumed run
  continues the schedule exactly), gradient clipping is DeepSpeed's ``gradient_clipping``.
- Gradient accumulation is caller-driven: each rank runs the same number of micro-batches per
  step (padding with dummy ones) with the same number of LM-head chunks each (padding with empty
  chunks; :func:`lockstep_plan`, as ZeRO-3 requires), the accumulation boundary is set explicitly, and losses
  arrive already normalised by *global* counts times the world size (DeepSpeed averages
  gradients over ranks), so 1 rank and N ranks compute the same step for the same global batch.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from lopd.recipe import OptimConfig, TrainConfig
from lopd.train.cpu_ops import load_shm_comm_op
from lopd.train.losses import chunk_count, model_logprobs
from lopd.train.packing import MicroBatch, dummy_micro_batch
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
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # we set the boundary ourselves (variable micro-batch count)
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu() if bf16 is None else bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at every forward
        # and step from the third step on, draining the launch queue; lopd times steps itself
        "timers": {"throughput": {"enabled": False}},
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


def lockstep_plan(engine, micro_batches: list[MicroBatch]) -> list[int]:
    """The passes every rank makes over its micro-batches, identical on all ranks (ZeRO-3 all-gathers
    the parameters of every module call, so ranks must call the same modules the same number of
    times in the same order, or the job hangs).

    Returns ``plan`` with ``len(plan)`` = the most micro-batches any rank has (a rank with fewer
    runs :func:`dummy_micro_batch` passes after its own) and ``plan[i]`` = the most LM-head chunks
    any rank needs for its micro-batch ``i``: pass it as ``num_chunks`` to :func:`forward_logprobs`.
    Two all-reduces (MAX), the same on every rank.
    """
    n = int(all_reduce([len(micro_batches)], "max")[0])
    if n == 0:
        return []
    chunk = engine.module.chunk_size
    dummy = dummy_micro_batch().num_targets
    local = [chunk_count(micro_batches[i].num_targets if i < len(micro_batches) else dummy, chunk) for i in range(n)]
    return [int(c) for c in all_reduce(local, "max")]


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
    bf16 when the model's weights are bf16, else fp32. Returns the engine (``engine.module.lm`` is
    the HF model)."""
    import deepspeed

    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few scalars (float64) across ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


Stat = float | torch.Tensor
LossFn = Callable[[object, MicroBatch, int], tuple[torch.Tensor, dict[str, Stat]]]


def read_stats(stats: dict[str, Stat]) -> dict[str, float]:
    """Python floats of summed stats; the tensor ones (float64, on the device) are read in one
    transfer: one host sync per step instead of one per stat and micro-batch."""
    keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([stats[k].reshape(()) for k in keys]).tolist() if keys else []
    return {**{k: float(v) for k, v in stats.items() if k not in keys}, **dict(zip(keys, values, strict=True))}


def accumulate_and_step(engine, micro_batches: list[MicroBatch], loss_fn: LossFn, lr: float) -> dict[str, float]:
    """Forward/backward every micro-batch (the same count on every rank), then one optimizer step.

    ``loss_fn(engine, mb, num_chunks)`` returns (loss already scaled for global averaging, summable
    stats: Python floats or detached float64 scalar tensors, left on the device and summed there);
    it passes ``num_chunks`` to :func:`forward_logprobs` (:func:`lockstep_plan`: the same LM-head
    calls on every rank). Returns the stats summed over this rank's micro-batches (as floats, read
    after the last backward) plus ``grad_norm``.
    """
    plan = lockstep_plan(engine, micro_batches)
    n = len(plan)
    stats: dict[str, Stat] = {}
    dev = device()
    for i in range(n):
        real = i < len(micro_batches)
        mb = micro_batches[i] if real else dummy_micro_batch()
        engine.set_gradient_accumulation_boundary(i == n - 1)
        loss, s = loss_fn(engine, mb.to(dev), plan[i])
        engine.backward(loss if real else loss * 0.0, scale_wrt_gas=False)  # a dummy adds no gradient
        for k, v in (s.items() if real else ()):
            stats[k] = stats[k] + v if k in stats else v
    out = read_stats(stats)
    set_lr(engine, lr)
    pre = _local_grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    norm = pre if pre is not None else engine.get_global_grad_norm()
    out["grad_norm"] = float(norm) if norm is not None else float("nan")
    return out


def _local_grad_norm(engine) -> float:
    """Global L2 norm of the (already all-reduced) gradients under ZeRO-0, before clipping: the
    per-parameter float32 sums of squares, read in one transfer, summed in float64."""
    sq = [p.grad.float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return sum(torch.stack(sq).tolist()) ** 0.5 if sq else 0.0

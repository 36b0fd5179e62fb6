"""Resumable training checkpoints and the final Hugging Face checkpoint, without pickles.

A resumable checkpoint is a directory published under ``<stage prefix>/checkpoints/step-NNNNNN``
(manifest last) holding:

- ``model.safetensors`` + ``config.json`` + tokenizer: the full fp32 weights (a valid HF model);
  in a bf16 run these are the optimizer's fp32 master weights, not the bf16 copy the model runs;
- ``optimizer.safetensors``: AdamW ``exp_avg`` / ``exp_avg_sq`` per parameter name;
- ``state.json``: step, optimizer step count and the trainer's own JSON state (metrics so far);
- its manifest records the recipe's sha256 and, in its lineage, ``base_fingerprint``: the
  fingerprint of the model the run started from.

Weights and moments are full tensors by parameter name, gathered from and scattered back to
the ZeRO partitions (any stage) with DeepSpeed's tensor-fragment API (``safe_get/set_full_*``;
under ZeRO-0 the torch optimizer's own tensors: the parameters in fp32, DeepSpeed's fp32
copies in bf16), so a checkpoint resumes on any number of ranks.

A checkpoint is resumed only by the run that made it (:func:`check_resumable`): the same base
model and the same recipe; anything else is refused, and ``--force`` starts over.

Resuming loads the weights into the model (in the training dtype) *before* DeepSpeed wraps it,
then :func:`restore` writes the saved fp32 weights into the optimizer's fp32 master copies
(which DeepSpeed builds from the bf16 weights: without this a bf16 run would resume from its
weights rounded to bf16, losing every update below bf16 resolution) and the Adam moments and
step count. A killed run continues bit-for-bit, in fp32 and in bf16 (same data order, same
schedule, same master weights and Adam state). Nothing read from a store is unpickled
(safetensors and JSON only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from lopd import LopdError
from lopd.layout import checkpoint_prefix, checkpoint_step, checkpoints_prefix
from lopd.manifest import fetch, has_manifest, publish, read_manifest
from lopd.store import Store


class ResumeError(LopdError):
    """The latest checkpoint belongs to another run (another base model or recipe)."""

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _names(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return list(engine.module.lm.named_parameters())


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's tensor-fragment API owns ``p``'s fp32 copy (ZeRO 1-3, bf16 optimizer)."""
    return hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")


def _masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 in bf16: model parameter id → the fp32 copy DeepSpeed's optimizer wrapper updates
    (and keys the Adam state by). Empty in fp32, where the torch optimizer updates the parameter."""
    opt = engine.optimizer
    if not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
        return {}
    return {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
            for lp, hp in zip(lg, hg, strict=True)}


def _link_optimizer_state(engine) -> None:
    """ZeRO 1-2: point every parameter's fragment mapping at its group's Adam state. DeepSpeed
    links them once, after stepping the first of several parameter groups, when the other
    groups' state does not exist yet; linking again (views, no copies) once it does fixes that."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    if not (hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups")):
        return
    state = _inner_optimizer(engine).state
    for lps, hp in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, strict=True):
        if hp in state:
            lazy_init_hp_params_optimizer_state(lps, hp, state)


def _full_param(p: torch.nn.Parameter, masters: dict[int, torch.Tensor]) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    v = safe_get_full_fp32_param(p) if _partitioned(p) else masters.get(id(p), p)
    return v.detach().float().cpu().clone()


def _full_state(engine, p: torch.nn.Parameter, key: str, masters: dict[int, torch.Tensor]) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    if _partitioned(p):
        v = safe_get_full_optimizer_state(p, key)
    else:  # ZeRO-0: the torch optimizer holds the parameter (fp32) or its fp32 copy (bf16)
        v = _inner_optimizer(engine).state.get(masters.get(id(p), p), {}).get(key)
    return None if v is None else v.detach().float().cpu().clone()


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 (master) weights and Adam moments by parameter name (collective: call on every rank)."""
    weights, moments = {}, {}
    masters = _masters(engine)
    _link_optimizer_state(engine)
    for name, p in _names(engine):
        weights[name] = _full_param(p, masters)
        for k in ADAM_KEYS:
            v = _full_state(engine, p, k, masters)
            if v is not None:
                moments[f"{name}::{k}"] = v
    return weights, moments


def _adam_step(engine) -> int:
    for st in _inner_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def save_hf(engine, tokenizer, out: Path, weights: dict[str, torch.Tensor] | None = None,
            dtype: torch.dtype | None = None) -> None:
    """Write a Hugging Face checkpoint (safetensors, config, tokenizer) on rank 0.

    ``weights`` from :func:`gather_state` when already gathered (else gathered here: collective).
    """
    if weights is None:
        weights, _ = gather_state(engine)
    if dist.get_rank() != 0:
        return
    model = engine.module.lm
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) if dtype is not None else v for k, v in weights.items()}
    model.save_pretrained(out, state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_checkpoint(engine, tokenizer, store: Store, stage_prefix: str, step: int, state: dict[str, Any],
                    workdir: Path, **manifest_fields: Any) -> str | None:
    """Gather and publish a resumable checkpoint after ``step`` optimizer steps (collective).

    Returns the checkpoint's store prefix on rank 0, None elsewhere.
    """
    weights, moments = gather_state(engine)
    prefix = checkpoint_prefix(stage_prefix, step)
    if dist.get_rank() == 0:
        local = workdir / f"ckpt-{step:06d}"
        shutil.rmtree(local, ignore_errors=True)
        save_hf(engine, tokenizer, local, weights)
        save_file(moments, str(local / "optimizer.safetensors"))
        (local / "state.json").write_text(json.dumps({"step": step, "adam_step": _adam_step(engine),
                                                      "trainer": state}))
        publish(store, prefix, local, **manifest_fields)
        shutil.rmtree(local, ignore_errors=True)
    dist.barrier()
    return prefix if dist.get_rank() == 0 else None


def latest_checkpoint(store: Store, stage_prefix: str) -> str | None:
    """Prefix of the newest complete (manifested) checkpoint under ``stage_prefix``, or None."""
    steps = [s for o in store.list(checkpoints_prefix(stage_prefix)) if (s := checkpoint_step(o.key)) is not None]
    for s in sorted(steps, reverse=True):
        prefix = checkpoint_prefix(stage_prefix, s)
        if has_manifest(store, prefix):
            return prefix
    return None


def check_resumable(store: Store, prefix: str, base_fingerprint: str, recipe_sha256: str) -> None:
    """Refuse (:class:`ResumeError`, naming both values) to resume the checkpoint at ``prefix``
    unless its manifest records this run's base model fingerprint and recipe sha256: weights
    trained from another base, or under another learning rate, schedule or data, are not this
    run's."""
    m, _ = read_manifest(store, prefix)
    where = store.url(prefix)
    had = m.lineage.get("base_fingerprint")
    if had != base_fingerprint:
        raise ResumeError(f"{where}: checkpoint was trained from base model {had or '(not recorded)'}, this run "
                          f"starts from {base_fingerprint}; refusing to resume (--force starts over)")
    if m.recipe_sha256 != recipe_sha256:
        raise ResumeError(f"{where}: checkpoint was made under recipe sha256 {m.recipe_sha256 or '(not recorded)'}, "
                          f"this run's is {recipe_sha256}; refusing to resume (--force starts over)")


def fetch_checkpoint(store: Store, prefix: str, dest: Path) -> Path:
    """Materialise a checkpoint locally (verified against its manifest)."""
    return fetch(store, prefix, dest)


def _prime_optimizer(engine) -> None:
    """Make ZeRO create (and link) its optimizer state, which it does lazily at the first step:
    one step with all-zero gradients at lr 0 leaves the weights unchanged."""
    from lopd.train.engine import device, forward_logprobs, set_lr
    from lopd.train.packing import dummy_micro_batch

    mb = dummy_micro_batch().to(device())  # one selected position
    engine.set_gradient_accumulation_boundary(True)
    lp, _ = forward_logprobs(engine, mb)
    engine.backward(lp.sum() * 0.0, scale_wrt_gas=False)
    set_lr(engine, 0.0)
    engine.step()


def restore(engine, ckpt_dir: Path) -> dict[str, Any]:
    """Write the checkpoint's fp32 weights into the optimizer's master copies (and the model's
    own weights, except ZeRO-3 partitions), and its Adam moments and step count, into the
    already built engine; returns ``state.json``. The model must have been loaded from
    ``ckpt_dir`` before wrapping (ZeRO-3 partitions its weights as it wraps them)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state = json.loads((ckpt_dir / "state.json").read_text())
    names = _names(engine)
    partitioned = any(_partitioned(p) for _, p in names)
    if partitioned:
        _prime_optimizer(engine)
        _link_optimizer_state(engine)
    masters = _masters(engine)
    inner = _inner_optimizer(engine)
    weights_file, moments_file = ckpt_dir / "model.safetensors", ckpt_dir / "optimizer.safetensors"
    with safe_open(str(weights_file), "pt") as fw, safe_open(str(moments_file), "pt") as fm:
        have, saved = set(fw.keys()), set(fm.keys())
        for name, p in names:
            if name not in have:
                raise ResumeError(f"{weights_file}: no weight {name!r} for this model; refusing to resume")
            w = fw.get_tensor(name).to(p.device)
            hp = masters.get(id(p), p)
            with torch.no_grad():
                if partitioned:
                    safe_set_full_fp32_param(p, w)
                if not hasattr(p, "ds_id"):  # ZeRO 0-2 keep the full weights in the model
                    p.data.copy_(w.view_as(p))
                if hp is not p:  # ZeRO-0 in bf16: DeepSpeed's fp32 copy
                    hp.data.copy_(w.view_as(hp))
            for k in ADAM_KEYS:
                if f"{name}::{k}" not in saved:
                    continue
                v = fm.get_tensor(f"{name}::{k}").to(p.device)
                if partitioned:
                    safe_set_full_optimizer_state(p, v, k)
                else:
                    inner.state[hp][k] = v.to(hp.dtype).view_as(hp).clone()
    step = float(state["adam_step"])
    params = list(inner.state.keys()) if partitioned else [masters.get(id(p), p) for _, p in names]
    for p in params:
        st = inner.state[p]
        st["step"] = torch.tensor(step) if not isinstance(st.get("step"), (int, float)) else step
    return state

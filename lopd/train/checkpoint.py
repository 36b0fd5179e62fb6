"""Resumable training checkpoints and the final Hugging Face checkpoint, without pickles.

A resumable checkpoint is a directory published under ``<stage prefix>/checkpoints/step-NNNNNN``
(manifest last) holding:

- ``model.safetensors`` + ``config.json`` + tokenizer: the full fp32 weights (a valid HF model);
- ``optimizer.safetensors``: AdamW ``exp_avg`` / ``exp_avg_sq`` per parameter name, gathered
  from the ZeRO partitions (any stage) with DeepSpeed's tensor-fragment API;
- ``state.json``: step, optimizer step count and the trainer's own JSON state (metrics so far);
- its manifest records the recipe's sha256 and, in its lineage, ``base_fingerprint``: the
  fingerprint of the model the run started from.

A checkpoint is resumed only by the run that made it (:func:`check_resumable`): the same base
model and the same recipe; anything else is refused, and ``--force`` starts over.

Resuming loads the weights into the model *before* DeepSpeed wraps it, then scatters the
optimizer state back with the same API, so a killed run continues bit-for-bit (same data
order, same schedule, same Adam moments and step count). Nothing read from a store is
unpickled (safetensors and JSON only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

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


def _full_param(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    v = safe_get_full_fp32_param(p)
    return (v if v is not None else p.data).detach().float().cpu().clone()


def _full_state(engine, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_optimizer_state

    v = safe_get_full_optimizer_state(p, key)
    if v is None:  # ZeRO-0: the torch optimizer holds the parameter itself
        v = engine.optimizer.state.get(p, {}).get(key)
    return None if v is None else v.detach().float().cpu().clone()


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 weights and Adam moments by parameter name (collective: call on every rank)."""
    weights, moments = {}, {}
    for name, p in _names(engine):
        weights[name] = _full_param(p)
        for k in ADAM_KEYS:
            v = _full_state(engine, p, k)
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

    mb = dummy_micro_batch()
    mb.select[0, 0] = True
    mb = mb.to(device())
    engine.set_gradient_accumulation_boundary(True)
    lp, _ = forward_logprobs(engine, mb)
    engine.backward(lp.sum() * 0.0, scale_wrt_gas=False)
    set_lr(engine, 0.0)
    engine.step()


def restore_optimizer(engine, ckpt_dir: Path) -> dict[str, Any]:
    """Scatter the saved Adam moments and step count into the (already built) engine; returns
    ``state.json``. The weights must already have been loaded from ``ckpt_dir`` before wrapping."""
    from deepspeed.utils import safe_set_full_optimizer_state

    state = json.loads((ckpt_dir / "state.json").read_text())
    moments = load_file(str(ckpt_dir / "optimizer.safetensors"))
    zero0 = not any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for _, p in _names(engine))
    if not zero0:
        _prime_optimizer(engine)
    inner = _inner_optimizer(engine)
    for name, p in _names(engine):
        for k in ADAM_KEYS:
            v = moments.get(f"{name}::{k}")
            if v is None:
                continue
            if zero0:
                inner.state[p][k] = v.to(p.device, p.dtype).view_as(p).clone()
            else:
                safe_set_full_optimizer_state(p, v.to(p.device), k)
    step = float(state["adam_step"])
    params = [p for _, p in _names(engine)] if zero0 else list(inner.state.keys())
    for p in params:
        st = inner.state[p]
        st["step"] = torch.tensor(step) if not isinstance(st.get("step"), (int, float)) else step
    return state

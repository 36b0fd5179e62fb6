"""The harness both training stages share: arguments, resume, the step loop, checkpoints, publish.

A training job's ``main()``::

    run = TrainRun.start("opd", argv)                              # None: already published
    run.build(student)                                             # resume from the latest checkpoint
    run.loop(lambda step: opd_step(...))                          # log, checkpoint every K steps
    run.publish(inputs=..., lineage=..., plot_keys=...)            # HF checkpoint + metrics, manifest last

Checkpoints go to ``runs/<run_id>/<stage>/checkpoints/step-NNNNNN`` (see
:mod:`lopd.train.checkpoint`), each recording the base model's fingerprint and the recipe's
sha256; a run resumes only a checkpoint that records its own (else it stops, and ``--force``
starts over); the stage output (manifest last) is the final Hugging Face
checkpoint plus ``metrics.jsonl``, ``curves.png`` and TensorBoard events.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from lopd.layout import checkpoint_prefix, stage_prefix
from lopd.manifest import InputRef, publish, read_manifest
from lopd.models import ResolvedModel
from lopd.rounds import round_steps
from lopd.stage import StageContext, log
from lopd.stage import start as start_stage
from lopd.stages import instance, split
from lopd.train import checkpoint as ckpt
from lopd.train.engine import build_engine, init_distributed, lr_at, train_dtype
from lopd.train.metrics import MetricsLog
from lopd.train.varlen import set_attention

FAULT_ENV = "LOPD_FAULT_KILL_AFTER_STEP"  # fault injection for the resume tests: SIGKILL after step N


class TrainRun:
    def __init__(self, ctx: StageContext):
        self.stage, self.recipe, self.section = ctx.stage, ctx.recipe, ctx.section
        self.store, self.prefix = ctx.store, ctx.prefix
        self.rank, self.world = init_distributed()
        self.workdir = ctx.workdir
        self.round, self.rounds = ctx.round, ctx.rounds
        self.schedule_steps = self.section.train.steps  # the learning-rate schedule spans every round
        self.first, self.total = round_steps(self.schedule_steps, self.round, self.rounds)
        self.start_step = self.first
        self.continued_from: str | None = None
        self.engine = self.model = self.tokenizer = self.metrics = None
        self.trainer_state: dict[str, Any] = {}
        self.resumed_from: str | None = None
        self.base_fingerprint: str | None = None

    @classmethod
    def start(cls, stage: str, argv: Sequence[str] | None) -> TrainRun | None:
        """The stage harness's :func:`lopd.stage.start` (arguments, recipe, section from the
        registry, skip-if-published, ``--force``); None when the stage output already exists."""
        ctx = start_stage(stage, argv)
        return None if ctx is None else cls(ctx)

    # ------------------------------------------------------------------ setup

    def build(self, base: ResolvedModel) -> None:
        """Load the model (from the latest checkpoint when one exists and was made by this run:
        same base model, by its fingerprint, and same recipe), wrap it in DeepSpeed, restore the
        optimizer state."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.world > 1:
            dist.barrier()  # rank 0 may have just deleted the prefix (--force)
        model_dir, self.base_fingerprint = base.path, base.fingerprint
        previous = self._previous_round_state() if self.round > 1 else None  # a Lightning round continues it
        self.continued_from = previous and self.store.url(previous)
        latest = ckpt.latest_checkpoint(self.store, self.prefix)
        if latest is not None:
            ckpt.check_resumable(self.store, latest, self.base_fingerprint, self.recipe.sha256())
            self.resumed_from = self.store.url(latest)
        latest = latest or previous
        if latest is not None:
            model_dir = ckpt.fetch_checkpoint(self.store, latest, self.workdir / "resume")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=train_dtype(self.recipe.models.student.dtype))
        set_attention(model, self.section.train.attention)
        chunk = getattr(self.section, "logprob_chunk_tokens", 1024)
        self.engine = build_engine(model, self.section.train, self.section.optim, chunk)
        self.model = self.engine.module.lm
        if latest is not None:
            state = ckpt.restore(self.engine, model_dir)
            self.start_step, self.trainer_state = state["step"], state["trainer"]
            if not self.first <= self.start_step <= self.total:
                raise ckpt.ResumeError(f"{self.store.url(latest)}: checkpoint after step {self.start_step} is outside "
                                       f"round {self.round}'s steps {self.first}..{self.total}")
            log("resume", stage=self.stage, step=self.start_step, checkpoint=self.store.url(latest))
        self.metrics = MetricsLog(self.workdir / "final", self.total, self.trainer_state.get("history"),
                                  enabled=self.rank == 0, desc=self.stage)

    # ------------------------------------------------------------------ loop

    def _previous_round_state(self) -> str:
        """The resumable checkpoint Lightning round r-1 saved at its last step (its manifest's
        ``lineage.final_checkpoint``), checked: made under this recipe, from the base round r-1
        started from, after exactly the steps before this round."""
        stage, _ = split(self.stage)
        prev = stage_prefix(self.recipe.run_id, instance(stage, self.round - 1))
        m, _ = read_manifest(self.store, prev)
        at = m.lineage.get("final_checkpoint")
        if at != checkpoint_prefix(prev, self.first):
            raise ckpt.ResumeError(f"{self.store.url(prev)}: lineage.final_checkpoint is {at!r}, not the state after "
                                   f"step {self.first} that round {self.round} continues from")
        ckpt.check_resumable(self.store, at, m.lineage.get("base_fingerprint") or "", self.recipe.sha256())
        return at

    def lr(self, step: int) -> float:
        return lr_at(step, self.schedule_steps, self.section.optim)

    def loop(self, step_fn: Callable[[int, float], dict[str, float]]) -> None:
        """Run steps ``start_step .. total-1`` (this round's; all steps without rounds);
        ``step_fn(step, lr)`` returns the step's metrics. A round before the last ends with a
        resumable checkpoint of its last step, which the next round continues from."""
        ran = self.start_step < self.total
        for step in range(self.start_step, self.total):
            rec = {"step": step + 1, **step_fn(step, self.lr(step))}
            self.metrics.log(rec)
            self._after_step(step + 1)
        if self.round < self.rounds and ran:
            self.save_checkpoint(self.total)

    def _after_step(self, done: int) -> None:
        if done % self.section.train.checkpoint_every == 0 and done < self.total:
            self.save_checkpoint(done)
        if os.environ.get(FAULT_ENV) == str(done):
            log("fault-injection", stage=self.stage, step=done, signal="SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)

    def save_checkpoint(self, done: int) -> None:
        where = ckpt.save_checkpoint(self.engine, self.tokenizer, self.store, self.prefix, done,
                                     {"history": self.metrics.history}, self.workdir,
                                     stage=f"{self.stage}-checkpoint", run_id=self.recipe.run_id,
                                     recipe_sha256=self.recipe.sha256(), metrics={"step": done},
                                     lineage={"base_fingerprint": self.base_fingerprint})
        if where:
            log("checkpoint", stage=self.stage, step=done, uri=self.store.url(where))

    # ------------------------------------------------------------------ output

    def publish(self, inputs: dict[str, InputRef], lineage: dict[str, Any], plot_keys: list[str],
                summary: dict[str, Any] | None = None) -> None:
        """Write the final HF checkpoint + metrics and publish them (manifest last) from rank 0."""
        final = self.workdir / "final"
        weights, _ = ckpt.gather_state(self.engine)
        if self.rank == 0:
            ckpt.save_hf(self.engine, self.tokenizer, final, weights,
                         dtype=train_dtype(self.recipe.models.student.dtype))
            self.metrics.close(plot_keys)
            last = self.metrics.history[-1] if self.metrics.history else {}
            rounds = {} if self.rounds == 1 else {
                "round": self.round, "rounds": self.rounds, "continued_from": self.continued_from,
                "base_fingerprint": self.base_fingerprint,
                "final_checkpoint": checkpoint_prefix(self.prefix, self.total) if self.round < self.rounds else None}
            publish(self.store, self.prefix, final, stage=self.stage, run_id=self.recipe.run_id,
                    recipe_sha256=self.recipe.sha256(), inputs=inputs,
                    lineage={**lineage, "resumed_from": self.resumed_from, **rounds},
                    metrics={"steps": self.total, **{k: v for k, v in last.items() if k != "step"},
                             **(summary or {})})
            log("published", stage=self.stage, uri=self.store.url(self.prefix))
        dist.barrier()

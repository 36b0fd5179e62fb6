"""Recipe sections of the embedded default only: the ``bootstrap`` that makes the toy task and
models, and the ``repro`` study (the paper's table at toy scale, :mod:`lopd.repro`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lopd.sections import MAX_TOKENS, Section, SftConfig

MAX_TASK_ROWS = 10**6
"""Most rows of one synthetic task file (far above what a toy run needs)."""
MAX_OVERRIDE = 2**16
"""Largest value of an ``init-model`` config override (layers, widths, heads)."""


class InitModelSpec(Section):
    """A random-initialised model made by ``lopd init-model`` (see lopd/modelinit.py)."""

    arch: Literal["qwen3", "qwen3-moe"] = "qwen3"
    """Architecture."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """Size preset."""
    seed: int = 0
    """Initialisation seed."""
    overrides: dict[str, Annotated[int, Field(ge=0, le=MAX_OVERRIDE)]] = {}
    """Config overrides on the preset, e.g. ``{num_hidden_layers: 3}``; each value 0..2^16."""


class BootstrapConfig(Section):
    """Embedded default only: make the task data and both models before the stages run.

    ``lopd pipeline`` writes the synthetic task (lopd/data/synthetic.py) to ``data_dir``,
    creates the student base at ``models.student.uri`` and the teacher's initial weights,
    then trains the teacher with the sft stage on ground-truth solutions as the run
    ``<run_id>-teacher``; ``models.teacher.uri`` must name that run's sft output
    (``runs/<run_id>-teacher/sft`` under the store)."""

    data_dir: str = Field(min_length=1)
    """Directory for the task files (sft/opd prompts, benchmark, teacher chats, corpus)."""
    seed: int = 0
    """Task seed."""
    n_teacher: int = Field(4000, ge=1, le=MAX_TASK_ROWS)
    """Ground-truth chats to train the teacher on (at most 10^6)."""
    n_sft: int = Field(2000, ge=1, le=MAX_TASK_ROWS)
    """SFT prompts (the teacher answers them in sft-data; at most 10^6)."""
    n_opd: int = Field(1000, ge=1, le=MAX_TASK_ROWS)
    """OPD prompts (the SFT student answers them in precompute; at most 10^6)."""
    n_eval: int = Field(300, ge=1, le=MAX_TASK_ROWS)
    """Held-out benchmark problems (at most 10^6)."""
    min_terms: int = Field(3, ge=2, le=64)
    """Fewest numbers added per problem (at most 64)."""
    max_terms: int = Field(4, ge=2, le=64)
    """Most numbers added per problem (at most 64)."""
    max_value: int = Field(99, ge=2, le=10**9)
    """Largest number in a problem (numbers are drawn from 1..max_value; at most 10^9)."""
    vocab_size: int = Field(512, ge=300, le=MAX_TOKENS)
    """Tokenizer vocabulary (trained on the task corpus; teacher and student share it; at most 2^20)."""
    teacher_style: Literal["chain", "words"] = "chain"
    """How the ground-truth solutions the teacher learns are written."""
    teacher: InitModelSpec = InitModelSpec(size="small", seed=1)
    """The teacher's architecture before training."""
    teacher_sft: SftConfig = SftConfig()
    """How the teacher is trained on ground truth (the sft stage's settings)."""
    student: InitModelSpec = InitModelSpec(size="tiny", seed=2)
    """The student base."""


class ReproVariant(Section):
    """One row of the repro table: an OPD run on the shared SFT student and rollouts, or the
    control that spends the same updates on more SFT."""

    stage: Literal["opd", "sft"] = "opd"
    """opd: an OPD run from the SFT checkpoint. sft: the same-compute control: continue SFT from
    the SFT checkpoint on the study's SFT data with the OPD rows' updates, batch size and
    optimizer (``opd.train`` / ``opd.optim``), so a gain of OPD over SFT is not just more training."""
    opd: dict[str, Any] = {}
    """Changes to the recipe's ``opd`` section for this variant (nested keys), e.g.
    ``{mode: online}`` or ``{importance_weights: {enabled: true}}``."""
    precompute: dict[str, Any] = {}
    """Changes to the recipe's ``precompute`` section for this variant (nested keys), e.g.
    ``{teacher_topk: 8}``. A variant with changes here, or whose ``opd`` has ``rounds`` > 1, owns
    its rollouts: it samples and scores them in its own run, from the shared SFT checkpoint."""
    teacher: Literal["consistent", "inconsistent"] = "consistent"
    """inconsistent: train on rollouts scored by teacher B (ground truth written in
    ``repro.teacher_b_style``) while the SFT data came from teacher A (the ablation)."""

    @model_validator(mode="after")
    def _sft_takes_no_opd_changes(self) -> ReproVariant:
        if self.stage == "sft" and (self.opd or self.precompute or self.teacher != "consistent"):
            raise ValueError("a 'stage: sft' variant takes no 'opd' changes, no 'precompute' changes and no "
                             "'teacher' (it continues SFT on the study's SFT data)")
        return self


class ReproConfig(Section):
    """``lopd repro``: every variant trains from the same SFT checkpoint for the same number of
    updates, once per seed; one eval per seed scores the SFT student and every variant."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, max_length=100)
    """Seeds (at most 100); each sets the OPD data order and sampling, and the eval's sampling."""
    variants: dict[str, ReproVariant] = Field(min_length=1, max_length=100)
    """Row name (lowercase, digits, '-') -> variant (at most 100). The SFT student is always the first row."""
    rows: list[str] | None = Field(None, min_length=1, max_length=100)
    """Which variants to run and tabulate, in the variants' order (None = all)."""
    teacher_b_style: Literal["chain", "words"] = "words"
    """Solution style teacher B learns (for ``teacher: inconsistent`` variants)."""

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, ReproVariant]) -> dict[str, ReproVariant]:
        for name in v:
            if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) or name in ("sft", "eval", "b", "incons"):
                raise ValueError(f"variant {name!r}: use lowercase letters, digits and '-' "
                                 "(not sft, eval, b or incons: those runs exist already)")
        return v

    @field_validator("rows")
    @classmethod
    def _rows(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        variants = info.data.get("variants") or {}
        for name in v or []:
            if name not in variants:
                raise ValueError(f"unknown variant {name!r} (one of {', '.join(variants)}; "
                                 "the sft row is always shown)")
        return v

    def selected(self) -> dict[str, ReproVariant]:
        """The variants to run and tabulate: those in ``rows`` (all when unset), in the variants' order."""
        return {n: v for n, v in self.variants.items() if self.rows is None or n in self.rows}

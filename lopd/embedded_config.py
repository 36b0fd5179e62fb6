"""Recipe sections of the embedded default only: the ``bootstrap`` that makes the toy task and
models, and the ``repro`` study (the paper's table at toy scale, :mod:`lopd.repro`)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from lopd.sections import MAX_TOKENS, Section
from lopd.train_config import SftConfig

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
    """Held-out benchmark problems, the test split (at most 10^6)."""
    n_val: int = Field(0, ge=0, le=MAX_TASK_ROWS)
    """Validation problems (``<data_dir>/arith_val.jsonl``, disjoint from every other split) for
    choosing settings without looking at the test split (``repro.selection``); 0 = none; at most 10^6."""
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
    teacher_draw: int = Field(0, ge=0, le=1)
    """Which ``n_teacher`` ground-truth problems the teacher learns: 0 the first draw, 1 a second
    draw disjoint from it and from every other split (another teacher trained like the first on
    other problems, from the same initial weights); at most 1."""
    teacher: InitModelSpec = InitModelSpec(size="small", seed=1)
    """The teacher's architecture before training."""
    teacher_sft: SftConfig = SftConfig()
    """How the teacher is trained on ground truth (the sft stage's settings)."""
    student: InitModelSpec = InitModelSpec(size="tiny", seed=2)
    """The student base."""


GridValue = float | int | bool | str
"""One candidate value of a selection grid."""


def flat_grid(v: Any, prefix: str = "") -> Any:
    """A grid written nested like the ``opd`` section (``{optim: {lr: [...]}}``, which ``--set
    repro.selection.grid.optim.lr=...`` also writes) as dotted keys (``{"optim.lr": [...]}``)."""
    if not isinstance(v, dict):
        return v
    out: dict[str, Any] = {}
    for key, value in v.items():
        name = f"{prefix}{key}"
        out.update(flat_grid(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


Grid = Annotated[dict[str, Annotated[list[GridValue], Field(min_length=1, max_length=8)]], BeforeValidator(flat_grid)]
"""A selection grid: dotted key of a row's ``opd`` section -> its candidate values (written nested or dotted)."""


class ReproTeacher(Section):
    """Another teacher for the teacher-consistency rows, bootstrapped like teacher A (the recipe's
    ``bootstrap``: same initial weights, same training) with these changes."""

    style: Literal["chain", "words"] = "chain"
    """How its ground-truth solutions are written (``words``: a format clash with A's SFT data)."""
    draw: int = Field(0, ge=0, le=1)
    """Which ground-truth problems it learns (``bootstrap.teacher_draw``): 1 = a second draw,
    disjoint from A's; at most 1."""
    seed: int | None = None
    """Its training seed (data order; ``bootstrap.teacher_sft.train.seed``); None = A's."""


class ReproVariant(Section):
    """One row of the repro table: an OPD run from the shared SFT checkpoint, or SFT continued
    from it with the OPD rows' updates."""

    stage: Literal["opd", "sft"] = "opd"
    """opd: an OPD run from the SFT checkpoint. sft: continue SFT from the SFT checkpoint with the
    OPD rows' updates, batch size and optimizer (``opd.train`` / ``opd.optim``) on ``sft_data``."""
    sft_data: Literal["sft", "opd"] = "sft"
    """For ``stage: sft``: sft = the study's SFT data (the same-compute control: a gain of OPD over
    SFT is not just more training); opd = teacher A's answers to the OPD prompts, one per prompt,
    sampled like the SFT data (sequence-level distillation on OPD's prompt budget)."""
    opd: dict[str, Any] = {}
    """Changes to the recipe's ``opd`` section for this variant (nested keys), e.g.
    ``{mode: online}`` or ``{importance_weights: {enabled: true}}``."""
    precompute: dict[str, Any] = {}
    """Changes to the recipe's ``precompute`` section for this variant (nested keys), e.g.
    ``{teacher_topk: 8}``. A variant with changes here, or whose ``opd`` has ``rounds`` > 1, owns
    its rollouts: it samples and scores them in its own run, from the shared SFT checkpoint."""
    teacher: str | None = None
    """None: teacher A (the recipe's). Otherwise a name in ``repro.teachers``: that teacher scores
    the rollouts (offline) or the student's samples (online) while the SFT data came from A (the
    teacher-consistency ablations)."""
    grid: Grid = Field({}, max_length=8)
    """Keys of ``repro.selection.grid`` this variant replaces (e.g. ``{train: {steps: [32]}}`` to
    keep a regime's update count); the rest of the study's grid applies unchanged."""

    @model_validator(mode="after")
    def _stage_fields(self) -> ReproVariant:
        if self.stage == "sft" and (self.opd or self.precompute or self.teacher is not None):
            raise ValueError("a 'stage: sft' variant takes no 'opd' changes, no 'precompute' changes and no "
                             "'teacher' (it continues SFT on teacher A's answers)")
        if self.stage == "opd" and self.sft_data != "sft":
            raise ValueError("'sft_data' is for 'stage: sft' variants")
        return self


class ReproSelection(Section):
    """How every trained row's settings are chosen without looking at the test split
    (:mod:`lopd.repro_select`). Each candidate of ``grid`` (the product of its lists, in their
    order) trains on the selection seed, the first of ``repro.seeds``, and is evaluated on the
    ``validation`` benchmark; a row takes the candidate with the highest validation accuracy
    (ties: the earlier candidate). The grid is the same for every row, so no method is tuned more
    than another; only the test runs with the chosen settings are evaluated on the test split."""

    validation: str = Field(min_length=1)
    """The validation benchmark file, in the eval benchmark's format and disjoint from it (the
    bootstrap writes ``<data_dir>/arith_val.jsonl`` with ``bootstrap.n_val`` problems)."""
    grid: Grid = Field({}, max_length=8)
    """Candidate values (1-8 each, at most 8 keys) of settings of a row's ``opd`` section, written
    like it (``{optim: {lr: [1.0e-4, 2.0e-4]}, train: {steps: [40, 80]}}``) and kept as dotted
    keys (``optim.lr``, ``train.steps``). The SFT rows (``stage: sft``) take only the
    ``optim.*`` and ``train.*`` keys. ``train.steps`` candidates of a one-round run with a constant
    learning rate and no warm-up are validated at the checkpoints of one run of the most updates
    (the weights an s-update run ends with); otherwise each candidate is its own run."""
    eval: dict[str, Any] = {}
    """Changes to the recipe's ``eval`` section for the validation run (e.g. ``{k: 2, inference:
    {backend: hf}}``); intermediate checkpoints need the ``hf`` backend (a resumable checkpoint
    also holds ``optimizer.safetensors``, and vLLM loads every ``*.safetensors`` of a directory)."""


class ReproGradCosine(Section):
    """The offline-vs-online gradient diagnostic (``opd.grad_discrepancy_every``) for some rows on the
    first seed: each named row's test run is repeated with the diagnostic on (run
    ``<run>-<row>-cos[-<digest>]-s<seed>``; the same updates, since the diagnostic only reads the
    weights). Before every ``every``-th update it samples fresh rollouts of the step's prompts from the
    current student, scores them with the teacher and compares the OPD gradient on them with the
    gradient on the stored rollouts: their cosine and norm ratio, plotted as ``grad-cosine.png``."""

    rows: list[str] = Field(min_length=1, max_length=20)
    """Rows that train offline on their seed's shared rollouts (at most 20)."""
    every: int = Field(20, ge=1, le=10**6)
    """Measure before every ``every``-th update (the first included); at most 10^6."""


class ReproConfig(Section):
    """``lopd repro``: every variant trains from the same SFT checkpoint for the same number of
    updates, once per seed; one eval per seed scores the SFT student and every variant."""

    seeds: list[int] = Field([0, 1, 2], min_length=1, max_length=100)
    """Seeds (0..10^6, at most 100); each sets the OPD data order and sampling and the eval's
    sampling, and with ``independent_seeds`` everything else downstream of the teachers."""
    independent_seeds: bool = True
    """True: seed s also re-runs the student's initialisation (``bootstrap.student.seed + s``), its
    SFT (``sft.train.seed + s``, the SFT data order) and the rollouts' sampling
    (``precompute.sampling.seed + s``) as the run ``<run>-s<s>`` (seed 0 is the recipe's own run), so
    the intervals cover the whole chain below the teachers. False: every seed shares the recipe's
    SFT checkpoint and rollouts (only OPD and the eval vary)."""
    selection: ReproSelection | None = None
    """How the rows' settings are chosen on a validation split; None = the recipe's settings as
    they are."""
    teachers: dict[str, ReproTeacher] = Field({}, max_length=10)
    """Other teachers by name (lowercase, digits, '-'; at most 10), for variants' ``teacher``."""
    variants: dict[str, ReproVariant] = Field(min_length=1, max_length=100)
    """Row name (lowercase, digits, '-') -> variant (at most 100). The SFT student is always the first row."""
    rows: list[str] | None = Field(None, min_length=1, max_length=100)
    """Which variants to run and tabulate, in the variants' order (None = all)."""
    grad_cosine: ReproGradCosine | None = None
    """The offline-vs-online gradient cosine for some rows (None: not measured)."""

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(not 0 <= s <= 10**6 for s in v):
            raise ValueError("seeds must be distinct integers in 0..10^6")
        return v

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, v: dict[str, ReproTeacher]) -> dict[str, ReproTeacher]:
        for name in v:
            if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) or re.search(r"-s[0-9]+$", name):
                raise ValueError(f"teacher {name!r}: use lowercase letters, digits and '-', not ending in "
                                 "-s<digits> (the variants' run ids end so)")
        return v

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, ReproVariant], info: ValidationInfo) -> dict[str, ReproVariant]:
        for name in v:
            if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) or name in ("sft", "eval", "kd"):
                raise ValueError(f"variant {name!r}: use lowercase letters, digits and '-' "
                                 "(not sft, eval or kd: those runs exist already)")
        teachers = info.data.get("teachers") or {}
        for name, var in v.items():
            if var.teacher is not None and var.teacher not in teachers:
                raise ValueError(f"variant {name!r}: teacher {var.teacher!r} is not in repro.teachers "
                                 f"({', '.join(teachers) or 'none'})")
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

    @field_validator("grad_cosine")
    @classmethod
    def _cosine_rows(cls, v: ReproGradCosine | None, info: ValidationInfo) -> ReproGradCosine | None:
        variants = info.data.get("variants") or {}
        for name in v.rows if v else []:
            if name not in variants:
                raise ValueError(f"unknown variant {name!r} (one of {', '.join(variants)})")
        return v

    def selected(self) -> dict[str, ReproVariant]:
        """The variants to run and tabulate: those in ``rows`` (all when unset), in the variants' order."""
        return {n: v for n, v in self.variants.items() if self.rows is None or n in self.rows}

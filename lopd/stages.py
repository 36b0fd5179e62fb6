"""The stage registry: the one table of pipeline stages, in run order.

Every consumer reads it: the CLI (``lopd run``/``render``/``deploy``/``logs``/``stages``), the
local runner (:mod:`lopd.runner`), the Kubernetes renderer (the chart's ``module`` and
``training`` values come from here), ``lopd status``, the pipelines' dependency order and the
Makefile's stage list (``lopd stages --names``). Adding a stage is one row here plus one
``jobs/<module>.py`` whose ``main()`` calls :func:`lopd.stage.start` (or
:meth:`lopd.train.trainer.TrainRun.start`) with the stage's name.

Each stage is one container entrypoint ``python -m jobs.<module>`` configured by one recipe
section; training stages run under torchrun (ranks, one shard), inference stages as shards
(``<section>.shards`` Indexed-Job completions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lopd import LopdError


def _no_inputs(recipe: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    """CLI / Helm name (``sft-data``)."""
    section: str
    """Recipe section that configures it (``sft_data``)."""
    module: str
    """Entrypoint module under ``jobs/`` (``python -m jobs.<module>``)."""
    training: bool
    """Launched with torchrun (ranks, one shard) rather than as inference shards."""
    reads: Callable[[Any], tuple[str, ...]] = field(default=_no_inputs, compare=False)
    """``recipe -> stages`` whose published output this stage reads (before those the recipe lacks
    are dropped)."""
    summary: str = ""
    """One line for ``lopd stages`` and the help texts."""

    @property
    def entrypoint(self) -> str:
        """The module to run: ``jobs.<module>``."""
        return f"jobs.{self.module}"

    @property
    def kind(self) -> str:
        return "training" if self.training else "inference"

    def of(self, recipe: Any) -> Any:
        """This stage's recipe section, or None when the recipe does not have the stage."""
        return getattr(recipe, self.section)

    def shards(self, recipe: Any) -> int:
        """How many processes (pods) make the stage: 1 for training (its ranks are one torchrun
        group), else the section's ``shards``."""
        return 1 if self.training else self.of(recipe).shards

    def inputs(self, recipe: Any) -> list[str]:
        """The stages of ``recipe`` whose published output this stage reads."""
        have = set(stages_of(recipe))
        return [s for s in self.reads(recipe) if s in have]


def _opd_reads(recipe: Any) -> tuple[str, ...]:
    # offline (Lightning) OPD trains on precompute's rollouts; online OPD samples from the SFT student
    return ("precompute",) if recipe.opd.mode == "offline" else ("sft",)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft-data", "sft_data", "sft_data", False, summary="the teacher answers the SFT prompts"),
    Stage("sft", "sft", "sft", True, lambda r: ("sft-data",), "the student base is fine-tuned on them"),
    Stage("precompute", "precompute", "precompute", False, lambda r: ("sft",),
          "the SFT student answers the OPD prompts once; the same teacher scores every token"),
    Stage("opd", "opd", "opd", True, _opd_reads, "the student trains on the rollouts (offline or online OPD)"),
    Stage("eval", "eval", "evaluate", False, lambda r: ("opd",), "checkpoints are evaluated on the benchmarks"),
)}
TRAINING_STAGES = tuple(n for n, s in STAGES.items() if s.training)


def get(name: str) -> Stage:
    """The registry row of ``name``; a one-line error listing the stages otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        raise LopdError(f"unknown stage {name!r} (one of {', '.join(STAGES)})") from None


def stages_of(recipe: Any) -> list[str]:
    """The stages a recipe has, in run order."""
    return [n for n, s in STAGES.items() if s.of(recipe) is not None]

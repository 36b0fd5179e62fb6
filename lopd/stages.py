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

Lightning rounds (``opd.rounds: R`` > 1, offline OPD) repeat the *rounded* stages (precompute,
opd) once per round. Each round is a stage instance with its own name, store prefix, manifest,
Helm release and log: round 1 keeps the stage's name, round r >= 2 is ``<stage>-r<r>``
(``precompute-r2``, ``opd-r2``; a ``/`` cannot appear in Kubernetes or file names), run by the
same entrypoint with ``--round r``. The instances run in the order
``precompute, opd, precompute-r2, opd-r2, ..., eval``; eval reads the last round's opd.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lopd import LopdError


def _no_inputs(recipe: Any, round: int) -> tuple[str, ...]:
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
    reads: Callable[[Any, int], tuple[str, ...]] = field(default=_no_inputs, compare=False)
    """``(recipe, round) -> stage instances`` whose published output this stage reads (before those
    the recipe lacks are dropped); ``round`` is 1 except for a rounded stage's later rounds."""
    summary: str = ""
    """One line for ``lopd stages`` and the help texts."""
    rounded: bool = False
    """Repeated once per Lightning round (``opd.rounds``): instances ``<name>-r2``, ``<name>-r3``, ..."""

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

    def inputs(self, recipe: Any, round: int = 1) -> list[str]:
        """The stage instances of ``recipe`` whose published output this stage (in ``round``) reads."""
        have = set(stages_of(recipe))
        return [s for s in self.reads(recipe, round) if s in have]


def rounds(recipe: Any) -> int:
    """How many Lightning rounds the recipe runs: ``opd.rounds`` (offline OPD), else 1."""
    opd = getattr(recipe, "opd", None)
    return opd.rounds if opd is not None and opd.mode == "offline" else 1


def instance(stage: str, round: int) -> str:
    """The name of ``stage`` in ``round``: the stage's own name in round 1, else ``<stage>-r<round>``."""
    return stage if round == 1 else f"{stage}-r{round}"


_ROUND_RE = re.compile(r"(?P<stage>[a-z][a-z-]*?)-r(?P<round>[1-9][0-9]*)")


def split(name: str) -> tuple[str, int]:
    """``(stage, round)`` of a stage instance name (``opd-r2`` -> ``("opd", 2)``; ``opd`` -> ``("opd", 1)``)."""
    m = _ROUND_RE.fullmatch(name)
    if m and m["stage"] in STAGES and STAGES[m["stage"]].rounded and int(m["round"]) >= 2:
        return m["stage"], int(m["round"])
    return name, 1


def _precompute_reads(recipe: Any, round: int) -> tuple[str, ...]:
    # round 1 samples with the SFT student; round r with the student as round r-1's OPD left it
    return ("sft",) if round == 1 else (instance("opd", round - 1),)


def _opd_reads(recipe: Any, round: int) -> tuple[str, ...]:
    # offline (Lightning) OPD trains on its round's rollouts (and continues the previous round's
    # optimizer state); online OPD samples from the SFT student
    if recipe.opd.mode != "offline":
        return ("sft",)
    return (instance("precompute", round),) + (() if round == 1 else (instance("opd", round - 1),))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft-data", "sft_data", "sft_data", False, summary="the teacher answers the SFT prompts"),
    Stage("sft", "sft", "sft", True, lambda r, k: ("sft-data",), "the student base is fine-tuned on them"),
    Stage("precompute", "precompute", "precompute", False, _precompute_reads,
          "the SFT student answers the OPD prompts once; the same teacher scores every token", rounded=True),
    Stage("opd", "opd", "opd", True, _opd_reads, "the student trains on the rollouts (offline or online OPD)",
          rounded=True),
    Stage("eval", "eval", "evaluate", False, lambda r, k: (instance("opd", rounds(r)),),
          "checkpoints are evaluated on the benchmarks"),
)}
TRAINING_STAGES = tuple(n for n, s in STAGES.items() if s.training)


def get(name: str) -> Stage:
    """The registry row of ``name`` (a stage or a round instance such as ``opd-r2``); a one-line
    error listing the stages otherwise."""
    try:
        return STAGES[split(name)[0]]
    except KeyError:
        raise LopdError(f"unknown stage {name!r} (one of {', '.join(STAGES)}; a Lightning round: "
                        "precompute-r2, opd-r2, ...)") from None


def inputs_of(recipe: Any, name: str) -> list[str]:
    """The stage instances whose published output the stage instance ``name`` reads."""
    stage, round = split(name)
    return get(stage).inputs(recipe, round)


def stages_of(recipe: Any) -> list[str]:
    """The stage instances a recipe has, in run order: each rounded stage's later rounds follow
    the last rounded stage's first (``precompute, opd, precompute-r2, opd-r2, ..., eval``)."""
    names = [n for n, s in STAGES.items() if s.of(recipe) is not None]
    rounded = [n for n in names if STAGES[n].rounded]
    out: list[str] = []
    for n in names:
        out.append(n)
        if rounded and n == rounded[-1]:
            out += [instance(m, k) for k in range(2, rounds(recipe) + 1) for m in rounded]
    return out

"""The one table of pipeline stages, in run order: the CLI, the local pipeline and the
Kubernetes rendering all read it (before, each kept its own copy).

Each stage is one container entrypoint ``python -m jobs.<module>`` configured by one recipe
section; training stages run under torchrun (several ranks), inference stages as shards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    """CLI / Helm name (``sft-data``)."""
    section: str
    """Recipe section that configures it (``sft_data``)."""
    module: str
    """Entrypoint module under ``jobs/``."""
    training: bool
    """Launched with torchrun (ranks) rather than as inference shards."""

    def of(self, recipe):
        """This stage's recipe section, or None when the recipe does not have the stage."""
        return getattr(recipe, self.section)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft-data", "sft_data", "sft_data", False),
    Stage("sft", "sft", "sft", True),
    Stage("precompute", "precompute", "precompute", False),
    Stage("opd", "opd", "opd", True),
    Stage("eval", "eval", "evaluate", False),
)}
TRAINING_STAGES = tuple(n for n, s in STAGES.items() if s.training)


def stages_of(recipe) -> list[str]:
    """The stages a recipe has, in run order."""
    return [n for n, s in STAGES.items() if s.of(recipe) is not None]

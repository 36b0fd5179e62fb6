"""A repro :class:`lopd.repro.Study` of the tiny recipe in a temporary store, for the repro tests."""

from __future__ import annotations

from lopd.recipe import load_recipe
from lopd.repro import Study
from tests.helpers.cli import REPO

TINY = REPO / "jobs" / "recipes" / "tiny.yaml"


class QuietConsole:
    """A console that prints nothing (the study's progress lines)."""

    def print(self, *a, **k):
        pass


SHARED = ("repro.selection=null", "repro.independent_seeds=false", "repro.rows=null", "repro.grad_cosine=null")
"""``--set`` overrides for the study with every variant, the recipe's settings as they are and
seeds that share the SFT student and rollouts, and no gradient-cosine runs (the protocol's parts
are tested on their own)."""


def study(tmp_path, *overrides, shared: bool = True) -> Study:
    """The tiny recipe's study with its store at ``tmp_path`` and ``overrides`` (``--set`` style),
    after :data:`SHARED` unless ``shared`` is False (the recipe's own protocol)."""
    return Study(load_recipe(TINY, [f"store={tmp_path}", *(SHARED if shared else ()), *overrides]), QuietConsole())

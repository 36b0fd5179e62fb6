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


def study(tmp_path, *overrides) -> Study:
    """The tiny recipe's study with its store at ``tmp_path`` and ``overrides`` (``--set`` style)."""
    return Study(load_recipe(TINY, [f"store={tmp_path}", *overrides]), QuietConsole())

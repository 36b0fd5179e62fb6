"""What every command shares: the group class that turns errors into one line, recipe and
cluster options, the STAGE argument (its choices come from the stage registry)."""

from __future__ import annotations

import os

import click

from lopd import LopdError
from lopd.stages import STAGES, split


class LopdGroup(click.Group):
    """Turns LopdError into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LopdError as e:
            if os.environ.get("LOPD_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def recipe_options(f):
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe value, Helm-style (a.b.c=value); repeatable.")(f)
    return click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False),
                        help="Recipe YAML (see jobs/recipes/).")(f)


def cluster_options(f):
    f = click.option("--context", default=None, help="kubeconfig context (default: the current one).")(f)
    return click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False),
                        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")(f)


class StageChoice(click.Choice):
    """``click.Choice`` over the stage registry, read when the command runs (not frozen at import)."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(STAGES)

    @choices.setter
    def choices(self, _value) -> None:
        pass

    def convert(self, value, param, ctx):
        """A stage, or a Lightning round's instance of a rounded stage (``opd-r2``)."""
        if isinstance(value, str) and split(value)[1] > 1:
            return value
        return super().convert(value, param, ctx)


def stage_argument(f):
    return click.argument("stage", type=StageChoice())(f)


def load(recipe: str, overrides: tuple[str, ...]):
    from lopd.recipe import load_recipe

    return load_recipe(recipe, overrides)

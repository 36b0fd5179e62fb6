"""The ``lopd`` command line (Click).

Every user-facing error is one line on stderr and a non-zero exit: :class:`lopd.LopdError`
subclasses carry their own message; nothing prints a traceback unless ``LOPD_DEBUG=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from lopd import LopdError, __version__
from lopd.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent



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
    f = click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False),
                     help="Recipe YAML (see jobs/recipes/).")(f)
    return f


@click.group(cls=LopdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lopd")
def main() -> None:
    """Lightning OPD: offline on-policy distillation as batch jobs (local or Kubernetes).

    Stages: sft-data -> sft -> precompute -> opd -> eval. See README.md.
    """


# --------------------------------------------------------------------------- recipe


@main.group()
def recipe() -> None:
    """Validate and show recipes."""


@recipe.command("validate")
@recipe_options
def recipe_validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe: exit 0 and print 'ok', or one line naming the bad key."""
    from lopd.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    click.echo(f"ok: {recipe} (run_id={r.run_id}, recipe_sha256={r.sha256()[:12]})")


@recipe.command("show")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def recipe_show(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied)."""
    import json

    from lopd.recipe import load_recipe, recipe_yaml

    r = load_recipe(recipe, overrides)
    click.echo(json.dumps(r.model_dump(mode="json"), indent=2) if as_json else recipe_yaml(r), nl=False)


# --------------------------------------------------------------------------- store


@main.group()
def store() -> None:
    """Inspect the artifact store."""


@store.command("ls")
@click.argument("uri")
@click.option("--long", "-l", "long_", is_flag=True, help="Show sizes.")
def store_ls(uri: str, long_: bool) -> None:
    """List objects under URI (s3://bucket/prefix, file:///path or a path)."""
    from lopd.store import open_store

    objs = open_store(uri).list()
    for o in objs:
        click.echo(f"{o.size:>14,d}  {o.key}" if long_ else o.key)
    if not objs:
        click.echo(f"(nothing under {uri})", err=True)


# --------------------------------------------------------------------------- run


def stage_command(stage: str, recipe: str, overrides: tuple[str, ...], extra: list[str],
                  nproc: int = 1) -> list[str]:
    """The local command line for one stage: python -m jobs.<module>, or torchrun for training."""
    module, distributed = STAGES[stage].module, STAGES[stage].training
    args = ["--recipe", recipe, *[a for o in overrides for a in ("--set", o)], *extra]
    if distributed and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "-m", f"jobs.{module}", *args]
    return [sys.executable, "-m", f"jobs.{module}", *args]


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("stage", type=click.Choice(list(STAGES)))
@recipe_options
@click.option("--shard-index", type=int, default=None, help="Shard to run (inference stages).")
@click.option("--num-shards", type=int, default=None, help="Shard count (inference stages).")
@click.option("--nproc", type=int, default=1, show_default=True, help="Training ranks (torchrun).")
@click.option("--force", is_flag=True, help="Re-run even if the stage's manifest exists.")
def run(stage: str, recipe: str, overrides: tuple[str, ...], shard_index: int | None,
        num_shards: int | None, nproc: int, force: bool) -> None:
    """Run one STAGE locally, as the container would (same entrypoint)."""
    from lopd.recipe import load_recipe

    load_recipe(recipe, overrides)  # fail fast, one line
    module = STAGES[stage].module
    if not (REPO_ROOT / "jobs" / f"{module}.py").is_file():
        raise LopdError(f"stage {stage!r} is not implemented yet (jobs/{module}.py does not exist)")
    extra: list[str] = []
    if shard_index is not None:
        extra += ["--shard-index", str(shard_index)]
    if num_shards is not None:
        extra += ["--num-shards", str(num_shards)]
    if force:
        extra.append("--force")
    cmd = stage_command(stage, recipe, overrides, extra, nproc)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    rc = subprocess.call(cmd, cwd=os.getcwd(), env=env)
    if rc:
        raise SystemExit(rc)


# --------------------------------------------------------------------------- init-model


@main.command("init-model")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--arch", type=click.Choice(["qwen3", "qwen3-moe"]), default="qwen3", show_default=True)
@click.option("--size", type=click.Choice(["tiny", "small", "base"]), default="tiny", show_default=True)
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="Text file to train the tokenizer on.")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
              help="Reuse this model directory's tokenizer instead (teacher and student must share one).")
@click.option("--vocab-size", type=int, default=512, show_default=True, help="BPE vocabulary size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=None, help="Override num_hidden_layers.")
@click.option("--hidden-size", type=int, default=None, help="Override hidden_size.")
@click.option("--intermediate-size", type=int, default=None, help="Override intermediate_size.")
@click.option("--heads", type=int, default=None, help="Override num_attention_heads.")
@click.option("--kv-heads", type=int, default=None, help="Override num_key_value_heads.")
@click.option("--head-dim", type=int, default=None, help="Override head_dim (32 or 64 for vLLM CPU).")
@click.option("--experts", type=int, default=4, show_default=True, help="MoE: experts per layer.")
@click.option("--experts-per-token", type=int, default=2, show_default=True, help="MoE: routed experts.")
@click.option("--max-positions", type=int, default=4096, show_default=True, help="Context length.")
def init_model_cmd(out, arch, size, corpus, tokenizer, vocab_size, seed, layers, hidden_size,
                   intermediate_size, heads, kv_heads, head_dim, experts, experts_per_token,
                   max_positions) -> None:
    """Create a random-initialised HF model (Qwen3 or Qwen3-MoE) with a trained tokenizer."""
    from lopd.modelinit import init_model

    overrides = {k: v for k, v in dict(
        num_hidden_layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim).items() if v is not None}
    path = init_model(out, arch=arch, size=size, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size,
                      seed=seed, overrides=overrides, max_position_embeddings=max_positions,
                      num_experts=experts, num_experts_per_tok=experts_per_token)
    from lopd.lineage import read_manifest
    from lopd.store import open_store

    m, _ = read_manifest(open_store(path))
    click.echo(f"{path}  ({arch}/{size}, {m.lineage['parameters']:,} parameters, "
               f"fingerprint {m.lineage['fingerprint'][:16]})")


@main.command("fingerprint")
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision (for hub ids).")
def fingerprint_cmd(model: str, revision: str | None) -> None:
    """Print the fingerprint of MODEL (store URI, directory or hub id)."""
    from lopd.lineage import fingerprint

    click.echo(fingerprint(model, revision))


# render, deploy, status, logs, pipeline: lopd/k8s/commands.py (kubernetes/helm imported lazily there)
from lopd.k8s.commands import COMMANDS as _K8S_COMMANDS  # noqa: E402

for _cmd in _K8S_COMMANDS:
    main.add_command(_cmd)

@main.group("repro", invoke_without_command=True)
@click.option("--recipe", "-r", type=click.Path(dir_okay=False), default=None, help="Recipe YAML with a repro section.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--seeds", default=None, metavar="0,1,2", help="Seeds instead of repro.seeds.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Training ranks (torchrun).")
@click.pass_context
def repro(ctx: click.Context, recipe: str | None, overrides: tuple[str, ...], seeds: str | None, nproc: int) -> None:
    """Run the paper's comparison at toy scale (SFT, Lightning OPD and its variants, online OPD)
    over several seeds: a markdown table with 95% intervals and a PNG (see docs/repro.md).
    `lopd repro check` compares the results with an expected-results file."""
    if ctx.invoked_subcommand is not None:
        return
    if recipe is None:
        raise LopdError("lopd repro: --recipe is required")
    from lopd.repro import run as run_repro

    try:
        seed_list = [int(x) for x in seeds.split(",")] if seeds else None
    except ValueError:
        raise LopdError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    run_repro(recipe, overrides, seed_list, nproc)


@repro.command("check")
@click.option("--expected", required=True, type=click.Path(dir_okay=False), help="Expected-results JSON.")
@click.option("--results", default=None, type=click.Path(dir_okay=False),
              help="results.json of a study (default: <store>/runs/<run>/repro/results.json of --recipe).")
@click.option("--recipe", "-r", type=click.Path(dir_okay=False), default=None, help="Recipe YAML of the study.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
def repro_check(expected: str, results: str | None, recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Exit 1 when a row's accuracy leaves its expected tolerance or a claim fails."""
    from lopd.repro import check

    if results is None:
        if recipe is None:
            raise LopdError("lopd repro check: give --results or --recipe")
        from lopd.pipeline import local_run_dir
        from lopd.recipe import load_recipe

        results = str(local_run_dir(load_recipe(recipe, overrides)) / "repro" / "results.json")
    failures = check(Path(results), Path(expected))
    for f in failures:
        click.echo(f"FAIL {f}", err=True)
    if failures:
        raise SystemExit(1)
    click.echo(f"ok: {results} matches {expected}")


@main.command("report")
@click.option("--recipe", "-r", type=click.Path(dir_okay=False), default=None,
              help="Recipe YAML: its store and run_id locate the eval stage.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--store", "store_uri", default=None, help="Store root (instead of --recipe).")
@click.option("--run-id", default=None, help="Run id (instead of --recipe).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Also write the report files here (default: a temp dir).")
@click.option("--publish/--no-publish", default=True, show_default=True,
              help="Write the report to <store>/runs/<run>/eval/report/ with its manifest.")
def report_cmd(recipe: str | None, overrides: tuple[str, ...], store_uri: str | None, run_id: str | None,
               out: str | None, publish: bool) -> None:
    """Render a run's eval report (summary.json, report.md, accuracy.png) from the store."""
    from lopd.eval.report import report_from_store
    from lopd.lineage import stage_prefix
    from lopd.store import open_store

    if recipe:
        from lopd.recipe import load_recipe

        r = load_recipe(recipe, overrides)
        store_uri, run_id = store_uri or r.store, run_id or r.run_id
    if not store_uri or not run_id:
        raise LopdError("lopd report: give --recipe, or both --store and --run-id")
    summary, local = report_from_store(open_store(store_uri), stage_prefix(run_id, "eval"), out, publish, run_id)
    for c, res in summary["results"].items():
        avgs = ", ".join(f"{b} {100 * m['avg']:.1f}%" for b, m in res["benchmarks"].items())
        click.echo(f"{c}: {avgs}")
    click.echo(f"report: {local / 'report.md'}")


if __name__ == "__main__":
    main()

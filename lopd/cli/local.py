"""``lopd stages``, ``lopd run``, ``lopd pipeline``, ``lopd report``, ``lopd repro``: the commands that
run stages, on top of the local runner (:mod:`lopd.runner`) and the Kubernetes pipeline
(:mod:`lopd.k8s.pipeline`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lopd import LopdError
from lopd.cli.options import cluster_options, load, recipe_options, stage_argument
from lopd.stages import STAGES


@click.command("stages")
@click.option("--names", is_flag=True, help="Only the names, one per line (for scripts and the Makefile).")
@click.option("--json", "as_json", is_flag=True, help="The registry as JSON.")
def stages(names: bool, as_json: bool) -> None:
    """List the pipeline stages in run order: kind, recipe section, entrypoint, what each does."""
    if names:
        click.echo("\n".join(STAGES))
        return
    rows = [{"name": s.name, "kind": s.kind, "section": s.section, "entrypoint": s.entrypoint,
             "summary": s.summary} for s in STAGES.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<11} {r['kind']:<9} {r['section']:<11} python -m {r['entrypoint']:<16} {r['summary']}")


@click.command("run", context_settings={"ignore_unknown_options": True})
@stage_argument
@recipe_options
@click.option("--shard-index", type=int, default=None, help="Shard to run (inference stages).")
@click.option("--num-shards", type=int, default=None, help="Shard count (inference stages).")
@click.option("--nproc", type=int, default=1, show_default=True, help="Training ranks (torchrun).")
@click.option("--force", is_flag=True, help="Redo the stage even if its manifest exists.")
def run(stage: str, recipe: str, overrides: tuple[str, ...], shard_index: int | None,
        num_shards: int | None, nproc: int, force: bool) -> None:
    """Run one STAGE locally, as the container would (same entrypoint)."""
    from lopd.runner import run_stage_process

    load(recipe, overrides)  # fail fast, one line
    extra: list[str] = []
    if shard_index is not None:
        extra += ["--shard-index", str(shard_index)]
    if num_shards is not None:
        extra += ["--num-shards", str(num_shards)]
    if force:
        extra.append("--force")
    rc = run_stage_process(stage, recipe, overrides, extra, nproc)
    if rc:
        raise SystemExit(rc)


@click.command("pipeline")
@recipe_options
@click.option("--backend", type=click.Choice(["local", "k8s"]), default="local", show_default=True,
              help="local: the stages as subprocesses here; k8s: one Helm release per stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan (what is published, what would be deployed).")
@click.option("--poll", type=float, default=30.0, show_default=True, help="Seconds between store checks.")
@click.option("--timeout", type=float, default=None, help="Give up waiting for a stage after this many seconds.")
@click.option("--nproc", type=int, default=1, show_default=True, help="local: training ranks (torchrun).")
@click.option("--detach", is_flag=True,
              help="k8s: submit the in-cluster driver Job (it runs every stage) and return; "
                   "`lopd status` follows it, `lopd cancel` stops it.")
@cluster_options
def pipeline(recipe, overrides, backend, dry_run, poll, timeout, nproc, detach, kubeconfig, context) -> None:
    """Run all stages in order, each after its inputs are published, skipping published ones."""
    if backend == "local":
        if detach:
            raise LopdError("--detach applies to --backend k8s (the driver runs in the cluster)")
        if dry_run:
            raise LopdError("--dry-run applies to --backend k8s; locally, `lopd status -r RECIPE --store-only` "
                            "shows what is published")
        from lopd.runner import run_local

        run_local(recipe, overrides, nproc=nproc)
        return
    if detach and not dry_run:
        from lopd.k8s.driver import submit_on_cluster

        submit_on_cluster(load(recipe, overrides), kubeconfig, context, click.echo)
        return
    from lopd.k8s.pipeline import run_on_cluster

    run_on_cluster(load(recipe, overrides), kubeconfig, context, click.echo, poll=poll, timeout=timeout,
                   dry_run=dry_run)


@click.command("report")
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
    from lopd.layout import stage_prefix
    from lopd.store import open_store

    if recipe:
        r = load(recipe, overrides)
        store_uri, run_id = store_uri or r.store, run_id or r.run_id
    if not store_uri or not run_id:
        raise LopdError("lopd report: give --recipe, or both --store and --run-id")
    summary, local = report_from_store(open_store(store_uri), stage_prefix(run_id, "eval"), out, publish, run_id)
    for c, res in summary["results"].items():
        avgs = ", ".join(f"{b} {100 * m['avg']:.1f}%" for b, m in res["benchmarks"].items())
        click.echo(f"{c}: {avgs}")
    click.echo(f"report: {local / 'report.md'}")


@click.group("repro", invoke_without_command=True)
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
    from lopd.repro_run import run as run_repro

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
    from lopd.repro_results import check

    if results is None:
        if recipe is None:
            raise LopdError("lopd repro check: give --results or --recipe")
        from lopd.layout import local_run_dir, repro_dir

        r = load(recipe, overrides)
        results = str(repro_dir(local_run_dir(r.store, r.run_id)) / "results.json")
    failures = check(Path(results), Path(expected))
    for f in failures:
        click.echo(f"FAIL {f}", err=True)
    if failures:
        raise SystemExit(1)
    click.echo(f"ok: {results} matches {expected}")


@repro.command("expect")
@click.option("--results", required=True, type=click.Path(dir_okay=False), help="results.json of a study.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Expected-results file to write.")
def repro_expect(results: str, out: str) -> None:
    """Write the expected-results file a study implies (tolerances from its seed variance, claims
    from its significant paired differences against SFT), for `lopd repro check`."""
    import json

    from lopd.repro_results import ReproError, expected

    try:
        data = json.loads(Path(results).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReproError(f"repro expect: {results}: not a results file ({e})") from None
    Path(out).write_text(json.dumps(expected(data), indent=2) + "\n")
    click.echo(f"wrote {out}")


COMMANDS = [stages, run, pipeline, report_cmd, repro]

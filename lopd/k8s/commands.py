"""Click commands ``render``, ``deploy``, ``status``, ``logs`` and ``pipeline`` (registered by lopd.cli).

Each reads like its algorithm: load the recipe -> build the stage's values -> Helm / cluster /
store -> print. Every failure is a :class:`lopd.LopdError` (one line, exit 2).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from lopd import LopdError
from lopd.k8s import STAGE_MODULES, K8sError

STAGE = click.argument("stage", type=click.Choice(list(STAGE_MODULES)))


def recipe_opts(f):
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe value, Helm-style (a.b.c=value); repeatable.")(f)
    return click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False),
                        help="Recipe YAML (see jobs/recipes/).")(f)


def cluster_opts(f):
    f = click.option("--context", default=None, help="kubeconfig context (default: the current one).")(f)
    return click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False),
                        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")(f)


def _load(recipe: str, overrides: tuple[str, ...]):
    from lopd.recipe import load_recipe

    return load_recipe(recipe, overrides)


def _render(r, stage: str, validate: bool = True):
    from lopd.k8s import helm
    from lopd.k8s.validate import validate_objects
    from lopd.k8s.values import release_name, stage_values

    values = stage_values(r, stage)
    release = release_name(r.run_id, stage)
    rendered = helm.render(values, release, r.kubernetes.namespace)
    if validate:
        validate_objects(helm.objects(rendered))
    return values, release, rendered


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@click.command("render")
@STAGE
@recipe_opts
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to FILE, not stdout.")
@click.option("--manifests", is_flag=True,
              help="Print the Kubernetes objects rendered by Helm's engine (validated) instead of the values.")
def render(stage: str, recipe: str, overrides: tuple[str, ...], output: str | None, manifests: bool) -> None:
    """Render STAGE's Helm values (or, with --manifests, its objects) from the recipe."""
    from lopd.k8s import helm

    r = _load(recipe, overrides)
    if manifests:
        _, _, rendered = _render(r, stage)
        _emit(helm.manifests_text(rendered), output)
        return
    from lopd.k8s.values import release_name, stage_values, values_yaml

    values = stage_values(r, stage)
    helm.render(values, release_name(r.run_id, stage), r.kubernetes.namespace)  # schema-checked
    head = (f"# Helm values of stage {stage} of run {r.run_id}, rendered by `lopd render` from {recipe}.\n"
            f"# helm upgrade --install {release_name(r.run_id, stage)} helm/lopd -n {r.kubernetes.namespace} -f FILE\n")
    _emit(head + values_yaml(values), output)


def _wait(cluster, r, stage: str, poll: float, timeout: float | None) -> None:
    from lopd.k8s.pipeline import workload_status_fn

    status_of = workload_status_fn(cluster, r.run_id)
    start, last = time.monotonic(), None
    while True:
        st = status_of(stage)
        if st != last:
            click.echo(f"{stage}: {st[0] if st else 'not found'}" + (f" - {st[1]}" if st and st[1] else ""), err=True)
            last = st
        if st and st[0] == "Succeeded":
            return
        if st and st[0] == "Failed":
            raise K8sError(f"stage {stage} failed: {st[1]} (see `lopd logs {stage} -r RECIPE`)")
        if timeout is not None and time.monotonic() - start > timeout:
            raise K8sError(f"timed out after {timeout:.0f}s waiting for stage {stage}")
        time.sleep(poll)


@click.command("deploy")
@STAGE
@recipe_opts
@click.option("--dry-run", is_flag=True, help="Print the rendered, validated manifests; touch no cluster.")
@click.option("--wait", is_flag=True, help="Follow the stage until its Job/PyTorchJob succeeds or fails.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--poll", type=float, default=15.0, show_default=True, help="With --wait: seconds between checks.")
@cluster_opts
def deploy(stage, recipe, overrides, dry_run, wait, timeout, poll, kubeconfig, context) -> None:
    """Install STAGE's release (helm upgrade --install lopd-<run>-<stage>) on the cluster."""
    from lopd.k8s import helm

    r = _load(recipe, overrides)
    values, release, rendered = _render(r, stage)
    if dry_run:
        click.echo(helm.manifests_text(rendered), nl=False)
        click.echo(helm.notes(rendered), err=True)
        return
    click.echo(helm.upgrade_install(values, release, r.kubernetes.namespace), err=True)
    click.echo(helm.notes(rendered), err=True)
    if wait:
        from lopd.k8s.cluster import Cluster

        _wait(Cluster(r.kubernetes.namespace, kubeconfig, context), r, stage, poll, timeout)


@click.command("status")
@recipe_opts
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--store-only", is_flag=True, help="Do not ask the cluster; show the store's progress only.")
@cluster_opts
def status(recipe, overrides, as_json, store_only, kubeconfig, context) -> None:
    """Show the run's stages: Job/PyTorchJob state, pods, shard manifests done/total."""
    from lopd.k8s.status import format_table, gather
    from lopd.store import open_store

    r = _load(recipe, overrides)
    cluster = None
    if not store_only:
        from lopd.k8s.cluster import Cluster

        cluster = Cluster(r.kubernetes.namespace, kubeconfig, context)
    rows = gather(r, open_store(r.store), cluster)
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        where = "store only" if store_only else f"namespace {r.kubernetes.namespace}"
        click.echo(f"run {r.run_id}  store {r.store}  ({where})")
        click.echo(format_table(rows))


@click.command("logs")
@STAGE
@recipe_opts
@click.option("--shard", type=int, default=None, help="Only the pod of this shard (completion index).")
@click.option("--tail", type=int, default=None, help="Last N lines of each pod.")
@click.option("--follow", "-f", is_flag=True, help="Stream the logs (all pods, prefixed by pod name).")
@click.option("--teacher", is_flag=True, help="Online OPD: the teacher server's logs instead.")
@cluster_opts
def logs(stage, recipe, overrides, shard, tail, follow, teacher, kubeconfig, context) -> None:
    """Show the pod logs of STAGE, in shard order."""
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.logs import stage_logs, stage_pods

    r = _load(recipe, overrides)
    cluster = Cluster(r.kubernetes.namespace, kubeconfig, context)
    stage_logs(cluster, stage_pods(cluster, r.run_id, stage, shard, teacher), tail, follow, click.echo)


@click.command("pipeline")
@recipe_opts
@click.option("--backend", type=click.Choice(["local", "k8s"]), default="local", show_default=True,
              help="local: the stages as subprocesses here; k8s: one Helm release per stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan (what is published, what would be deployed).")
@click.option("--poll", type=float, default=30.0, show_default=True, help="Seconds between store checks.")
@click.option("--timeout", type=float, default=None, help="Give up waiting for a stage after this many seconds.")
@click.option("--nproc", type=int, default=1, show_default=True, help="local: training ranks (torchrun).")
@cluster_opts
def pipeline(recipe, overrides, backend, dry_run, poll, timeout, nproc, kubeconfig, context) -> None:
    """Run all stages in order, each after its inputs are published, skipping published ones."""
    if backend == "local":
        if dry_run:
            raise LopdError("--dry-run applies to --backend k8s; locally, `lopd status -r RECIPE --store-only` "
                            "shows what is published")
        from lopd.pipeline import run_local

        run_local(recipe, overrides, nproc=nproc)
        return
    from lopd.k8s import helm
    from lopd.k8s.pipeline import run_pipeline, workload_status_fn
    from lopd.store import open_store

    r = _load(recipe, overrides)
    for stage in ("sft-data", "sft", "precompute", "opd", "eval"):  # render all first: fail before deploying
        if getattr(r, stage.replace("-", "_")) is not None:
            _render(r, stage)

    def deploy_stage(stage: str) -> str:
        values, release, _ = _render(r, stage)
        return helm.upgrade_install(values, release, r.kubernetes.namespace)

    status_of = (lambda stage: None)
    if not dry_run:
        from lopd.k8s.cluster import Cluster

        status_of = workload_status_fn(Cluster(r.kubernetes.namespace, kubeconfig, context), r.run_id)
    run_pipeline(r, open_store(r.store), deploy_stage, status_of, click.echo, poll=poll, timeout=timeout,
                 dry_run=dry_run)


COMMANDS = [render, deploy, status, logs, pipeline]

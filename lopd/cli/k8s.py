"""``lopd render``, ``deploy``, ``status``, ``logs``: the Kubernetes commands.

Each reads like its algorithm: load the recipe -> build the stage's values -> Helm / cluster /
store -> print. Every failure is a :class:`lopd.LopdError` (one line, exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from lopd.cli.options import cluster_options, load, recipe_options, stage_argument


def _emit(text: str, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@click.command("render")
@stage_argument
@recipe_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to FILE, not stdout.")
@click.option("--manifests", is_flag=True,
              help="Print the Kubernetes objects rendered by Helm's engine (validated) instead of the values.")
def render(stage: str, recipe: str, overrides: tuple[str, ...], output: str | None, manifests: bool) -> None:
    """Render STAGE's Helm values (or, with --manifests, its objects) from the recipe."""
    from lopd.k8s import helm

    r = load(recipe, overrides)
    if manifests:
        _, _, rendered = helm.render_stage(r, stage)
        _emit(helm.manifests_text(rendered), output)
        return
    from lopd.k8s.values import release_name, stage_values, values_yaml

    values = stage_values(r, stage)
    helm.render(values, release_name(r.run_id, stage), r.kubernetes.namespace)  # schema-checked
    head = (f"# Helm values of stage {stage} of run {r.run_id}, rendered by `lopd render` from {recipe}.\n"
            f"# helm upgrade --install {release_name(r.run_id, stage)} helm/lopd -n {r.kubernetes.namespace} -f FILE\n")
    _emit(head + values_yaml(values), output)


@click.command("deploy")
@stage_argument
@recipe_options
@click.option("--dry-run", is_flag=True, help="Print the rendered, validated manifests; touch no cluster.")
@click.option("--wait", is_flag=True, help="Follow the stage until its Job/PyTorchJob succeeds or fails.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--poll", type=float, default=15.0, show_default=True, help="With --wait: seconds between checks.")
@cluster_options
def deploy(stage, recipe, overrides, dry_run, wait, timeout, poll, kubeconfig, context) -> None:
    """Install STAGE's release (helm upgrade --install lopd-<run>-<stage>) on the cluster."""
    from lopd.k8s import helm

    r = load(recipe, overrides)
    values, release, rendered = helm.render_stage(r, stage)
    if dry_run:
        click.echo(helm.manifests_text(rendered), nl=False)
        click.echo(helm.notes(rendered), err=True)
        return
    click.echo(helm.upgrade_install(values, release, r.kubernetes.namespace), err=True)
    click.echo(helm.notes(rendered), err=True)
    if wait:
        from lopd.k8s.cluster import Cluster
        from lopd.k8s.pipeline import wait_stage

        wait_stage(Cluster(r.kubernetes.namespace, kubeconfig, context), r, stage, poll, timeout,
                   lambda m: click.echo(m, err=True))


@click.command("status")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--store-only", is_flag=True, help="Do not ask the cluster; show the store's progress only.")
@cluster_options
def status(recipe, overrides, as_json, store_only, kubeconfig, context) -> None:
    """Show the run's stages: Job/PyTorchJob state, pods, shard manifests done/total."""
    from lopd.k8s.status import format_table, gather
    from lopd.store import open_store

    r = load(recipe, overrides)
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
@stage_argument
@recipe_options
@click.option("--shard", type=int, default=None, help="Only the pod of this shard (completion index).")
@click.option("--tail", type=int, default=None, help="Last N lines of each pod.")
@click.option("--follow", "-f", is_flag=True, help="Stream the logs (all pods, prefixed by pod name).")
@click.option("--teacher", is_flag=True, help="Online OPD: the teacher server's logs instead.")
@cluster_options
def logs(stage, recipe, overrides, shard, tail, follow, teacher, kubeconfig, context) -> None:
    """Show the pod logs of STAGE, in shard order."""
    from lopd.k8s import K8sError
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.logs import stage_logs, stage_pods

    r = load(recipe, overrides)
    cluster = Cluster(r.kubernetes.namespace, kubeconfig, context)
    try:
        pods = stage_pods(cluster, r.run_id, stage, shard, teacher)
    except K8sError as e:  # pods gone after the TTL: the logs the stage uploaded to the store
        from lopd.podlog import stored_logs
        from lopd.store import open_store

        store = open_store(r.store)
        saved = [] if teacher or not str(e).startswith("no pods") else stored_logs(store, r.run_id, stage)
        if shard is not None:
            saved = [(k, t) for k, t in saved if k.rsplit("/", 1)[1].startswith(f"{shard}-of-")]
        if not saved:
            raise
        for key, text in saved:
            click.echo(f"==> {store.url(key)} (uploaded by the stage; its pods are gone) <==")
            lines = text.splitlines()
            click.echo("\n".join(lines[-tail:] if tail else lines))
        return
    stage_logs(cluster, pods, tail, follow, click.echo)


@click.command("cancel")
@recipe_options
@cluster_options
def cancel(recipe, overrides, kubeconfig, context) -> None:
    """Stop the run: the pipeline driver and every Job, PyTorchJob and teacher of it (outputs stay)."""
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.driver import cancel as cancel_run
    from lopd.store import open_store

    r = load(recipe, overrides)
    cancel_run(r, open_store(r.store), Cluster(r.kubernetes.namespace, kubeconfig, context), click.echo)


COMMANDS = [render, deploy, status, logs, cancel]

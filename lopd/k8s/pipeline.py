"""``lopd pipeline --backend k8s``: deploy the stages in order, each once its inputs are published.

    for stage in the registry's order (those the recipe has, lopd.stages):
        if its manifest exists: skip                 (re-running is a no-op)
        wait until the manifests of its inputs exist (fail fast if an input's workload failed)
        helm upgrade --install lopd-<run>-<stage>
    wait until the last stage's manifest exists
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from lopd.k8s import K8sError
from lopd.k8s.status import workload_state
from lopd.layout import manifest_key, stage_prefix
from lopd.recipe import Recipe
from lopd.stages import inputs_of, stages_of
from lopd.store import Store, open_store


@dataclass
class Step:
    stage: str
    inputs: list[str]
    published: bool


def published(store: Store, run_id: str, stage: str) -> bool:
    return store.exists(manifest_key(stage_prefix(run_id, stage)))


def plan(recipe: Recipe, store: Store) -> list[Step]:
    return [Step(s, inputs_of(recipe, s), published(store, recipe.run_id, s)) for s in stages_of(recipe)]


def wait_published(recipe: Recipe, store: Store, stage: str, status_of: Callable[[str], tuple[str, str] | None],
                   poll: float, timeout: float | None, echo: Callable[[str], None]) -> None:
    """Block until ``stage``'s manifest exists; raise if its workload failed or on timeout."""
    start = time.monotonic()
    last = None
    while not published(store, recipe.run_id, stage):
        st = status_of(stage)
        if st and st[0] == "Failed":
            raise K8sError(f"stage {stage} failed: {st[1]} (see `lopd logs {stage}`)")
        if st != last:
            echo(f"  waiting for {stage}: {st[0] + (' - ' + st[1] if st[1] else '') if st else 'not deployed'}")
            last = st
        if timeout is not None and time.monotonic() - start > timeout:
            raise K8sError(f"timed out after {timeout:.0f}s waiting for {stage} to publish "
                           f"{store.url(manifest_key(stage_prefix(recipe.run_id, stage)))}")
        time.sleep(poll)
    echo(f"  {stage}: published")


def run_pipeline(recipe: Recipe, store: Store, deploy: Callable[[str], str],
                 status_of: Callable[[str], tuple[str, str] | None], echo: Callable[[str], None],
                 poll: float = 30.0, timeout: float | None = None, dry_run: bool = False) -> list[Step]:
    """Deploy every unpublished stage after its inputs; ``dry_run`` prints the plan only."""
    steps = plan(recipe, store)
    for step in steps:
        if step.published:
            echo(f"skip {step.stage}: already published")
            continue
        after = f" after {', '.join(step.inputs)}" if step.inputs else ""
        if dry_run:
            echo(f"deploy {step.stage}{after}")
            continue
        for dep in step.inputs:
            wait_published(recipe, store, dep, status_of, poll, timeout, echo)
        echo(f"deploy {step.stage}: {deploy(step.stage)}")
    if not dry_run and steps and not steps[-1].published:
        wait_published(recipe, store, steps[-1].stage, status_of, poll, timeout, echo)
    return steps


def workload_status_fn(cluster, run_id: str) -> Callable[[str], tuple[str, str] | None]:
    """``stage -> (state, detail)`` of its newest Job/PyTorchJob, or None when there is none."""
    from lopd.k8s.cluster import selector

    def status_of(stage: str) -> tuple[str, str] | None:
        sel = selector(run_id, stage)
        objs = [{"kind": "Job", **j} for j in cluster.jobs(sel)]
        objs += [{"kind": "PyTorchJob", **p} for p in cluster.pytorchjobs(sel)]
        if not objs:
            return None
        return workload_state(max(objs, key=lambda o: o["metadata"].get("creationTimestamp", "")))

    return status_of


def run_on_cluster(recipe: Recipe, kubeconfig: str | None, context: str | None, echo: Callable[[str], None],
                   poll: float = 30.0, timeout: float | None = None, dry_run: bool = False) -> list[Step]:
    """``lopd pipeline --backend k8s``: render (and validate) every stage first, so a bad recipe
    fails before anything is deployed, then :func:`run_pipeline` with Helm and the cluster."""
    from lopd.k8s import helm

    for stage in stages_of(recipe):
        helm.render_stage(recipe, stage)

    def deploy_stage(stage: str) -> str:
        values, release, _ = helm.render_stage(recipe, stage)
        return helm.upgrade_install(values, release, recipe.kubernetes.namespace)

    status_of: Callable[[str], tuple[str, str] | None] = lambda stage: None  # noqa: E731
    if not dry_run:
        from lopd.k8s.cluster import Cluster

        status_of = workload_status_fn(Cluster(recipe.kubernetes.namespace, kubeconfig, context), recipe.run_id)
    return run_pipeline(recipe, open_store(recipe.store), deploy_stage, status_of, echo, poll=poll,
                        timeout=timeout, dry_run=dry_run)


def wait_stage(cluster, recipe: Recipe, stage: str, poll: float, timeout: float | None,
               echo: Callable[[str], None]) -> None:
    """``lopd deploy --wait``: follow ``stage``'s newest Job/PyTorchJob until it succeeds; raise
    on failure or timeout. Prints each change of state."""
    status_of = workload_status_fn(cluster, recipe.run_id)
    start, last = time.monotonic(), None
    while True:
        st = status_of(stage)
        if st != last:
            echo(f"{stage}: {st[0] if st else 'not found'}" + (f" - {st[1]}" if st and st[1] else ""))
            last = st
        if st and st[0] == "Succeeded":
            return
        if st and st[0] == "Failed":
            raise K8sError(f"stage {stage} failed: {st[1]} (see `lopd logs {stage} -r RECIPE`)")
        if timeout is not None and time.monotonic() - start > timeout:
            raise K8sError(f"timed out after {timeout:.0f}s waiting for stage {stage}")
        time.sleep(poll)

"""The in-cluster pipeline driver: one Job that runs the stages in dependency order.

``lopd pipeline --backend k8s --detach`` (:func:`submit`) installs the chart with
``driver.enabled``: a Job (the ``lopd-deployer`` ServiceAccount of manifests/rbac.yaml) whose pod
runs ``python -m lopd.k8s.driver``, which does what the client-side pipeline does, inside the
cluster::

    for stage in the registry's order (those the recipe has):
        if its manifest exists: skip
        if its Job/PyTorchJob is still active (a previous driver pod deployed it): wait for it
        else: helm upgrade --install lopd-<run>-<stage>  (a failed workload is deleted first)
        wait until its manifest exists; a failed workload fails the driver (exit 2)

Progress goes to ``<store>/runs/<run>/_driver/progress.json`` after every change, so ``lopd
status`` shows it and a new driver pod (the old one was killed, or the run re-submitted) resumes
where the last one stopped. ``lopd cancel`` (:func:`cancel`) writes ``cancel.json`` there, which
the driver checks between steps, and deletes the driver Job and the run's workloads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from lopd.k8s import K8sError
from lopd.k8s.pipeline import plan, published
from lopd.k8s.status import DRIVER, progress_key
from lopd.layout import driver_prefix
from lopd.manifest import now
from lopd.recipe import Recipe
from lopd.store import Store

ACTIVE = ("Running", "Pending", "Suspended", "Restarting", "Failing")
StatusOf = Callable[[str], "tuple[str, str] | None"]


def cancel_key(run_id: str) -> str:
    return f"{driver_prefix(run_id)}/cancel.json"


def read_progress(store: Store, run_id: str) -> dict[str, Any] | None:
    key = progress_key(run_id)
    return store.read_json(key) if store.exists(key) else None


class _Progress:
    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.data = read_progress(store, run_id) or {"stages": {}}
        self.data["attempts"] = int(self.data.get("attempts", 0)) + 1
        self.data.setdefault("started", now())

    def save(self, stage: str | None = None, stage_state: str | None = None, detail: str = "", **run: Any) -> None:
        """Record ``stage``'s state (when given) and the run-level fields ``run`` (state, current, …)."""
        if stage is not None:
            self.data["stages"][stage] = {"state": stage_state, "detail": detail, "at": now()}
        self.data.update(run, updated=now())
        self.store.write_json(progress_key(self.run_id), self.data)


def drive(recipe: Recipe, store: Store, deploy: Callable[[str], str], status_of: StatusOf,
          remove: Callable[[str], None], echo: Callable[[str], None], poll: float = 30.0,
          timeout: float | None = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Run the pipeline to the end (or a cancel request); returns the progress record.

    ``deploy(stage)`` installs a stage's release, ``status_of(stage)`` is its newest workload's
    ``(state, detail)`` or None, ``remove(stage)`` deletes its workloads. Raises
    :class:`K8sError` when a stage fails or ``timeout`` seconds pass waiting for one.
    """
    run = recipe.run_id
    prog = _Progress(store, run)
    prog.save(state="running", current=None, message="")

    def stop() -> bool:
        if store.exists(cancel_key(run)):
            prog.save(state="cancelled", message="cancelled (lopd cancel)")
            echo("cancelled")
            return True
        return False

    for step in plan(recipe, store):
        s = step.stage
        if stop():
            return prog.data
        if step.published:
            echo(f"skip {s}: already published")
            prog.save(s, "Published", "already published")
            continue
        st = status_of(s)
        if st and st[0] in ACTIVE:
            echo(f"{s}: {st[0]}, deployed earlier: waiting for it")
        else:
            if st and st[0] == "Failed":
                echo(f"{s}: removing the failed workload to run it again")
                remove(s)
            echo(f"deploy {s}: {deploy(s)}")
        prog.save(s, "Deployed", current=s)
        start = time.monotonic()
        while not published(store, run, s):
            if stop():
                return prog.data
            st = status_of(s)
            if st and st[0] == "Failed":
                msg = f"stage {s} failed: {st[1]} (see `lopd logs {s}`)"
                prog.save(s, "Failed", st[1], state="failed", message=msg)
                raise K8sError(msg)
            if timeout is not None and time.monotonic() - start > timeout:
                msg = f"timed out after {timeout:.0f}s waiting for stage {s} to publish"
                prog.save(s, "TimedOut", "", state="failed", message=msg)
                raise K8sError(msg)
            sleep(poll)
        echo(f"{s}: published")
        prog.save(s, "Published")
    prog.save(state="succeeded", current=None, message="")
    return prog.data


# --------------------------------------------------------------------------- cluster side


def _remove_fn(cluster, run_id: str) -> Callable[[str], None]:
    from lopd.k8s.cluster import selector

    def remove(stage: str) -> None:
        sel = selector(run_id, stage)
        for kind, objs in (("Job", cluster.jobs(sel)), ("PyTorchJob", cluster.pytorchjobs(sel))):
            for o in objs:
                cluster.delete(kind, o["metadata"]["name"])

    return remove


def can_validate() -> bool:
    """Whether ``kubernetes-validate`` is installed (a dev dependency; the image has Helm's schema
    checks only)."""
    import importlib.util

    return importlib.util.find_spec("kubernetes_validate") is not None


def driver_state(cluster, run_id: str) -> tuple[str, str] | None:
    """The newest driver Job's (state, detail), or None."""
    from lopd.k8s.cluster import selector
    from lopd.k8s.status import workload_state

    jobs = cluster.jobs(selector(run_id, DRIVER))
    if not jobs:
        return None
    return workload_state({"kind": "Job", **max(jobs, key=lambda j: j["metadata"].get("creationTimestamp", ""))})


def submit(recipe: Recipe, store: Store, cluster, echo: Callable[[str], None],
           install: Callable[[dict[str, Any], str, str], str] | None = None) -> str:
    """Install the driver Job (re-submitting resumes: a finished driver Job is replaced, a
    running one is left alone); clears an earlier cancel request."""
    from lopd.k8s import helm
    from lopd.k8s.cluster import selector
    from lopd.k8s.values import driver_values, release_name

    for stage in [s.stage for s in plan(recipe, store)]:  # a bad recipe fails here, not in the cluster
        helm.render_stage(recipe, stage, validate=can_validate())
    values = driver_values(recipe)
    release = release_name(recipe.run_id, DRIVER)
    helm.objects(helm.render(values, release, recipe.kubernetes.namespace))
    st = driver_state(cluster, recipe.run_id)
    if st and st[0] in ACTIVE:
        echo(f"driver of run {recipe.run_id} is already {st[0]}: `lopd status` follows it")
        return release
    for j in cluster.jobs(selector(recipe.run_id, DRIVER)):
        cluster.delete("Job", j["metadata"]["name"])
    store.delete(cancel_key(recipe.run_id))
    how = (install or helm.upgrade_install)(values, release, recipe.kubernetes.namespace)
    echo(f"submitted the pipeline driver: {how}")
    return release


def cancel(recipe: Recipe, store: Store, cluster, echo: Callable[[str], None]) -> list[str]:
    """Ask the driver to stop, then delete the driver Job and every workload of the run."""
    from lopd.k8s.cluster import selector

    run = recipe.run_id
    store.write_json(cancel_key(run), {"requested": now()})
    sel = selector(run)
    gone = []
    for kind, objs in (("Job", cluster.jobs(sel)), ("PyTorchJob", cluster.pytorchjobs(sel)),
                       ("Deployment", cluster.deployments(sel))):
        for o in sorted(objs, key=lambda o: (o["metadata"].get("labels") or {}).get("lopd.io/stage") != DRIVER):
            if cluster.delete(kind, o["metadata"]["name"]):
                gone.append(f"{kind}/{o['metadata']['name']}")
    prog = read_progress(store, run)
    if prog is not None and prog.get("state") == "running":
        prog.update(state="cancelled", message="cancelled (lopd cancel)", updated=now())
        store.write_json(progress_key(run), prog)
    echo(f"cancelled run {run}: deleted {', '.join(gone) or 'nothing (no workloads left)'}")
    return gone


def submit_on_cluster(recipe: Recipe, kubeconfig: str | None, context: str | None,
                      echo: Callable[[str], None]) -> str:
    """``lopd pipeline --backend k8s --detach``: :func:`submit` with the kubeconfig's cluster."""
    from lopd.k8s.cluster import Cluster
    from lopd.store import open_store

    return submit(recipe, open_store(recipe.store), Cluster(recipe.kubernetes.namespace, kubeconfig, context), echo)


def main(argv: Sequence[str] | None = None) -> None:
    from lopd.k8s import helm
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.pipeline import workload_status_fn
    from lopd.progress import log
    from lopd.recipe import load_recipe
    from lopd.store import open_store

    p = argparse.ArgumentParser(prog="python -m lopd.k8s.driver", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--poll", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=None)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    store = open_store(recipe.store)
    for stage in [s.stage for s in plan(recipe, store)]:
        helm.render_stage(recipe, stage, validate=can_validate())  # every stage renders before anything runs
    cluster = Cluster(recipe.kubernetes.namespace)

    def deploy(stage: str) -> str:
        values, release, _ = helm.render_stage(recipe, stage, validate=can_validate())
        return helm.upgrade_install(values, release, recipe.kubernetes.namespace)

    drive(recipe, store, deploy, workload_status_fn(cluster, recipe.run_id), _remove_fn(cluster, recipe.run_id),
          lambda m: log("driver", message=m), poll=args.poll, timeout=args.timeout)


if __name__ == "__main__":  # pragma: no cover - the driver Job's command
    from lopd.stage import entrypoint

    entrypoint(main)

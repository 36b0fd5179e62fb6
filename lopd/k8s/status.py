"""A run's stages at a glance: workload state (Job / PyTorchJob), pods, and in the store the
shard manifests done out of the total and whether the stage's manifest is published.

Pure functions over API objects (dicts) and a :class:`lopd.store.Store`, so ``lopd status`` is
testable against recorded API responses; :func:`run_status` gathers them for a recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lopd.k8s.cluster import ROLE_LABEL, STAGE_LABEL, pod_index, selector
from lopd.k8s.values import release_name
from lopd.layout import driver_prefix, manifest_key, shard_of, shards_prefix, stage_prefix
from lopd.recipe import Recipe
from lopd.stages import get as get_stage
from lopd.stages import stages_of
from lopd.store import Store

BAD_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
               "CreateContainerError", "InvalidImageName", "RunContainerError"}


@dataclass
class StageStatus:
    stage: str
    release: str
    kind: str = "-"
    state: str = "NotDeployed"
    detail: str = ""
    pods: dict[str, int] = field(default_factory=dict)
    failed_pods: list[str] = field(default_factory=list)
    shards_done: int = 0
    shards_total: int = 1
    published: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _true_conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """(state, detail) of a batch/v1 Job: Succeeded, Failed, Failing, Suspended, Running or Pending."""
    st = job.get("status") or {}
    spec = job.get("spec") or {}
    conds = {c["type"]: c for c in _true_conditions(job)}
    counts = (f"{st.get('succeeded', 0)}/{spec.get('completions', 1)} completed, {st.get('active', 0)} active, "
              f"{st.get('failed', 0)} failed")
    for ctype, state in (("Complete", "Succeeded"), ("Failed", "Failed"), ("FailureTarget", "Failing")):
        if ctype in conds:
            c = conds[ctype]
            why = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            return state, f"{counts}; {why}" if why and state != "Succeeded" else counts
    if "Suspended" in conds or spec.get("suspend"):
        return "Suspended", f"{counts}; suspended (queued, e.g. waiting for Kueue quota)"
    if st.get("active", 0) > 0:
        return "Running", f"{counts}, {st.get('ready', 0)} ready"
    return "Pending", counts


def pytorchjob_state(pj: dict[str, Any]) -> tuple[str, str]:
    """(state, detail) of a kubeflow.org/v1 PyTorchJob from its latest true condition."""
    st = pj.get("status") or {}
    reps = ", ".join(
        f"{role} " + " ".join(f"{k}={v}" for k, v in sorted(r.items()) if k in ("active", "succeeded", "failed"))
        for role, r in sorted((st.get("replicaStatuses") or {}).items()))
    conds = _true_conditions(pj)
    if not conds:
        return "Pending", reps
    last = conds[-1]
    state = {"Created": "Pending", "Running": "Running", "Restarting": "Restarting", "Succeeded": "Succeeded",
             "Failed": "Failed", "Suspended": "Suspended"}.get(last["type"], last["type"])
    why = last.get("message") or last.get("reason") or ""
    detail = "; ".join(x for x in (reps, why if state in ("Failed", "Restarting", "Suspended") else "") if x)
    return state, detail


def workload_state(obj: dict[str, Any]) -> tuple[str, str]:
    return pytorchjob_state(obj) if obj.get("kind") == "PyTorchJob" else job_state(obj)


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod failed or is stuck (OOMKilled, ImagePullBackOff, Evicted, exit codes…), or None."""
    st = pod.get("status") or {}
    name = pod["metadata"]["name"]
    idx = pod_index(pod)
    label = f"{name}" + (f" (shard {idx})" if idx is not None else "")
    for cs in st.get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = cs.get("lastState") or {}
        if "waiting" in state and state["waiting"].get("reason") in BAD_WAITING:
            w = state["waiting"]
            return f"{label}: {w['reason']}" + (f": {_short(w.get('message'))}" if w.get("message") else "")
        term = state.get("terminated") or (last.get("terminated") if cs.get("restartCount") else None)
        if term and term.get("exitCode", 0) != 0:
            return f"{label}: {term.get('reason', 'Error')} (exit {term.get('exitCode')})" + (
                f": {_short(term.get('message'))}" if term.get("message") else "")
    if st.get("phase") == "Failed":
        why = f": {_short(st.get('message'))}" if st.get("message") else ""
        return f"{label}: {st.get('reason', 'Failed')}{why}"
    if st.get("phase") == "Pending":
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return f"{label}: {c.get('reason', 'Unschedulable')}: {_short(c.get('message'))}"
    return None


def _short(msg: str | None, n: int = 160) -> str:
    msg = " ".join((msg or "").split())
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def pods_summary(pods: list[dict[str, Any]]) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    problems = []
    for p in sorted(pods, key=lambda p: (pod_index(p) if pod_index(p) is not None else -1, p["metadata"]["name"])):
        phase = (p.get("status") or {}).get("phase", "Unknown")
        counts[phase] = counts.get(phase, 0) + 1
        why = pod_problem(p)
        if why:
            problems.append(why)
    return counts, problems


def store_progress(store: Store, run_id: str, stage: str, shards: int) -> tuple[int, bool]:
    """(shard manifests done out of ``shards``, stage manifest published) from the store."""
    prefix = stage_prefix(run_id, stage)
    published = store.exists(manifest_key(prefix))
    done = {s[0] for o in store.list(shards_prefix(prefix)) if (s := shard_of(o.key)) and s[1] == shards}
    return (shards if published and not done else len(done)), published


DRIVER = "driver"


def progress_key(run_id: str) -> str:
    """Where the pipeline driver records its progress (:mod:`lopd.k8s.driver`)."""
    return f"{driver_prefix(run_id)}/progress.json"


def driver_row(recipe: Recipe, store: Store, workloads: list[dict[str, Any]] | None) -> StageStatus | None:
    """The pipeline driver's row (its Job and its progress record), or None when there is neither."""
    key = progress_key(recipe.run_id)
    prog = store.read_json(key) if store.exists(key) else None
    mine = [w for w in workloads or [] if (w["metadata"].get("labels") or {}).get(STAGE_LABEL) == DRIVER]
    if prog is None and not mine:
        return None
    row = StageStatus(stage=DRIVER, release=release_name(recipe.run_id, DRIVER))
    if prog is not None:
        row.state = str(prog.get("state", "-")).title()
        at = f"at {prog['current']}" if prog.get("current") else ""
        row.detail = "; ".join(x for x in (at, prog.get("message") or "", f"attempt {prog.get('attempts', 1)}") if x)
        row.published = prog.get("state") == "succeeded"
    if mine:
        w = max(mine, key=lambda w: w["metadata"].get("creationTimestamp", ""))
        row.kind = "Job"
        state, detail = workload_state(w)
        if prog is None or state in ("Failed", "Failing") or prog.get("state") == "running":
            row.state = state
        row.detail = "; ".join(x for x in (row.detail, detail) if x)
    return row


def run_status(recipe: Recipe, store: Store, workloads: list[dict[str, Any]] | None,
               pods: list[dict[str, Any]] | None) -> list[StageStatus]:
    """One row per stage; ``workloads``/``pods`` None means the cluster was not asked."""
    rows = [r for r in [driver_row(recipe, store, workloads)] if r is not None]
    for stage in stages_of(recipe):
        shards = get_stage(stage).shards(recipe)
        row = StageStatus(stage=stage, release=release_name(recipe.run_id, stage), shards_total=shards)
        row.shards_done, row.published = store_progress(store, recipe.run_id, stage, shards)
        if workloads is None:
            row.state = "Published" if row.published else "-"
        else:
            mine = [w for w in workloads if (w["metadata"].get("labels") or {}).get(STAGE_LABEL) == stage]
            if mine:
                w = max(mine, key=lambda w: w["metadata"].get("creationTimestamp", ""))
                row.kind = w.get("kind", "Job")
                row.state, row.detail = workload_state(w)
            elif row.published:
                row.state = "Published"  # finished and cleaned up (ttlSecondsAfterFinished)
            stage_pods = [p for p in pods or [] if (p["metadata"].get("labels") or {}).get(STAGE_LABEL) == stage
                          and ROLE_LABEL not in (p["metadata"].get("labels") or {})]
            row.pods, row.failed_pods = pods_summary(stage_pods)
        rows.append(row)
    return rows


def gather(recipe: Recipe, store: Store, cluster) -> list[StageStatus]:
    """Ask the cluster (``cluster`` None: the store only) and the store."""
    if cluster is None:
        return run_status(recipe, store, None, None)
    sel = selector(recipe.run_id)
    workloads = [{"kind": "Job", **j} for j in cluster.jobs(sel)]
    workloads += [{"kind": "PyTorchJob", **p} for p in cluster.pytorchjobs(sel)]
    return run_status(recipe, store, workloads, cluster.pods(sel))


def format_table(rows: list[StageStatus]) -> str:
    """A fixed-width table, then one indented line per failed or stuck pod."""
    head = ("STAGE", "KIND", "STATE", "PODS", "SHARDS", "OUTPUT", "DETAIL")
    body = []
    for r in rows:
        pods = ", ".join(f"{n} {ph.lower()}" for ph, n in sorted(r.pods.items())) or "-"
        body.append((r.stage, r.kind, r.state, pods, f"{r.shards_done}/{r.shards_total}",
                     "published" if r.published else "-", r.detail))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x[:-1], widths, strict=True)) + "  " + x[-1] for x in [head, *body]]
    for r in rows:
        lines += [f"  ! {r.stage}: {p}" for p in r.failed_pods]
    return "\n".join(line.rstrip() for line in lines)

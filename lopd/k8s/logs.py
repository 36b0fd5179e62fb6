"""``lopd logs <stage>``: the pods of a stage in shard order, each log under a header, or
followed line by line with a ``[pod]`` prefix."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lopd.k8s import K8sError
from lopd.k8s.cluster import ROLE_LABEL, Cluster, pod_index, selector


def stage_pods(cluster: Cluster, run_id: str, stage: str, shard: int | None = None,
               teacher: bool = False) -> list[dict[str, Any]]:
    """The stage's pods (or its teacher server's), sorted by shard then name."""
    pods = [p for p in cluster.pods(selector(run_id, stage))
            if (ROLE_LABEL in (p["metadata"].get("labels") or {})) == teacher]
    if shard is not None:
        pods = [p for p in pods if pod_index(p) == shard]
    if not pods:
        what = f"shard {shard} of " if shard is not None else ""
        raise K8sError(f"no pods for {what}stage {stage} of run {run_id} in namespace {cluster.namespace} "
                       "(not deployed yet, or removed after ttlSecondsAfterFinished)")
    return sorted(pods, key=lambda p: (pod_index(p) if pod_index(p) is not None else -1, p["metadata"]["name"]))


def _container(pod: dict[str, Any]) -> str:
    return pod["spec"]["containers"][0]["name"]


def stage_logs(cluster: Cluster, pods: list[dict[str, Any]], tail: int | None, follow: bool,
               echo: Callable[[str], None]) -> None:
    if not follow:
        for p in pods:
            idx = pod_index(p)
            phase = (p.get("status") or {}).get("phase", "?")
            echo(f"==> {p['metadata']['name']}" + (f" [shard {idx}]" if idx is not None else "") + f" ({phase}) <==")
            for line in cluster.log(p["metadata"]["name"], _container(p), tail=tail):
                echo(line)
        return
    q: queue.Queue = queue.Queue()

    def pump(p: dict[str, Any]) -> None:
        name = p["metadata"]["name"]
        try:
            for line in cluster.log(name, _container(p), tail=tail, follow=True):
                q.put(f"[{name}] {line}")
        except K8sError as e:
            q.put(e)
        finally:
            q.put(None)

    for p in pods:
        threading.Thread(target=pump, args=(p,), daemon=True).start()
    for item in _drain(q, len(pods)):
        echo(item)


def _drain(q: queue.Queue, n: int) -> Iterator[str]:
    open_streams = n
    while open_streams:
        item = q.get()
        if item is None:
            open_streams -= 1
        elif isinstance(item, Exception):
            raise item
        else:
            yield item

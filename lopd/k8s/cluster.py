"""The kubernetes client: a run's Jobs, PyTorchJobs, Deployments and pods, pod logs, and deleting
workloads (``lopd cancel``, the driver retrying a failed stage).

Objects come back as plain dicts (the API's JSON), so Jobs and PyTorchJobs (a custom resource)
are handled alike. Configuration: in a pod, the in-cluster ServiceAccount; otherwise the
kubeconfig (``KUBECONFIG`` / ``~/.kube/config``, ``--context``). Errors become one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from lopd.k8s import K8sError

RUN_LABEL = "lopd.io/run"
STAGE_LABEL = "lopd.io/stage"
ROLE_LABEL = "lopd.io/role"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def selector(run_id: str, stage: str | None = None) -> str:
    return f"{RUN_LABEL}={run_id}" + (f",{STAGE_LABEL}={stage}" if stage else "")


class Cluster:
    """Access to one namespace."""

    def __init__(self, namespace: str, kubeconfig: str | None = None, context: str | None = None):
        try:
            from kubernetes import client, config
        except ImportError as e:  # pragma: no cover - k8s extra
            raise K8sError("the kubernetes client is not installed: pip install 'lopd[k8s]'") from e
        self.namespace = namespace
        try:
            if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
                cfg = client.Configuration.get_default_copy()
            else:
                cfg = client.Configuration()
                config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        except config.ConfigException as e:
            raise K8sError(f"no Kubernetes configuration ({' '.join(str(e).split())}): set KUBECONFIG or "
                           "pass --kubeconfig/--context") from None
        cfg.retries = 1
        self.host = cfg.host
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.apps = client.AppsV1Api(self.api)

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _preload_content=False, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            body = ""
            try:
                body = json.loads(e.body).get("message", "")
            except (TypeError, ValueError):
                pass
            raise K8sError(f"kubernetes API: {what} in namespace {self.namespace}: {e.status} {e.reason}"
                           + (f": {body}" if body else "")) from None
        except HTTPError as e:
            raise K8sError(f"cannot reach the Kubernetes API at {self.host} ({what}): "
                           f"{type(e).__name__}") from None

    def _list(self, what: str, fn, *args, **kwargs) -> list[dict[str, Any]]:
        resp = self._call(what, fn, *args, **kwargs)
        return [] if resp is None else json.loads(resp.data).get("items", [])

    def jobs(self, label_selector: str) -> list[dict[str, Any]]:
        return self._list("list jobs", self.batch.list_namespaced_job, self.namespace, label_selector=label_selector)

    def pytorchjobs(self, label_selector: str) -> list[dict[str, Any]]:
        """PyTorchJobs; an empty list where the CRD is not installed (404)."""
        return self._list("list pytorchjobs", self.custom.list_namespaced_custom_object, "kubeflow.org", "v1",
                          self.namespace, "pytorchjobs", label_selector=label_selector)

    def pods(self, label_selector: str) -> list[dict[str, Any]]:
        return self._list("list pods", self.core.list_namespaced_pod, self.namespace, label_selector=label_selector)

    def deployments(self, label_selector: str) -> list[dict[str, Any]]:
        return self._list("list deployments", self.apps.list_namespaced_deployment, self.namespace,
                          label_selector=label_selector)

    def delete(self, kind: str, name: str) -> bool:
        """Delete a Job, PyTorchJob or Deployment and (in the background) its pods; False when gone."""
        body = {"propagationPolicy": "Background"}
        fn, args = {
            "Job": (self.batch.delete_namespaced_job, (name, self.namespace)),
            "PyTorchJob": (self.custom.delete_namespaced_custom_object,
                           ("kubeflow.org", "v1", self.namespace, "pytorchjobs", name)),
            "Deployment": (self.apps.delete_namespaced_deployment, (name, self.namespace)),
        }[kind]
        return self._call(f"delete {kind.lower()} {name}", fn, *args, body=body) is not None

    def log(self, pod: str, container: str | None = None, tail: int | None = None,
            follow: bool = False) -> Iterator[str]:
        """A pod's log, line by line (streamed when ``follow``)."""
        kwargs: dict[str, Any] = {"container": container, "follow": follow}
        if tail is not None:
            kwargs["tail_lines"] = tail
        resp = self._call(f"logs of {pod}", self.core.read_namespaced_pod_log, pod, self.namespace, **kwargs)
        if resp is None:
            raise K8sError(f"pod {pod} not found in namespace {self.namespace}")
        buf = b""
        for chunk in resp.stream(4096, decode_content=True):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if buf:
            yield buf.decode("utf-8", "replace")
        resp.release_conn()


def pod_index(pod: dict[str, Any]) -> int | None:
    """The Indexed-Job completion index (= shard) of a pod, if any."""
    meta = pod.get("metadata", {})
    raw = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(INDEX_ANNOTATION)
    return int(raw) if raw is not None and str(raw).isdigit() else None

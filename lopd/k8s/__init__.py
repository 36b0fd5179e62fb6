"""Kubernetes: Helm values from a recipe, render/lint/deploy through Helm's engine, status and logs.

The only package of lopd that imports ``kubernetes`` (lazily, in :mod:`lopd.k8s.cluster`), so
the library and the stages run without it. Module map:

- :mod:`lopd.k8s.values`    recipe -> the chart's values for one stage; release names
- :mod:`lopd.k8s.helm`      render / lint (helm-python-sdk, offline) and ``helm upgrade --install``
- :mod:`lopd.k8s.validate`  rendered objects against the Kubernetes and PyTorchJob CRD schemas
- :mod:`lopd.k8s.cluster`   the kubernetes client: workloads and pods of a run, pod logs
- :mod:`lopd.k8s.status`    a run's stages: workload state, pods, shard manifests in the store
- :mod:`lopd.k8s.pipeline`  deploy the stages in order, each once its inputs are published;
                            follow one stage (``lopd deploy --wait``)
- :mod:`lopd.k8s.teacher`   container entrypoint of the online-OPD teacher server (vLLM)
- :mod:`lopd.k8s.driver`    the in-cluster pipeline driver Job: submit, drive, cancel
"""

from __future__ import annotations

import os
from pathlib import Path

from lopd import LopdError

CHART_DIR = Path(os.environ.get("LOPD_CHART", Path(__file__).resolve().parents[2] / "helm" / "lopd"))

class K8sError(LopdError):
    """A Kubernetes-side problem (render, deploy, cluster access), reported as one line."""


__all__ = ["CHART_DIR", "K8sError"]

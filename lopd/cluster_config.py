"""The recipe's ``kubernetes`` section: image, namespace, node pool, credentials, queueing.

Pure configuration (pydantic); the CLI turns it into Helm values in :mod:`lopd.k8s.values`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from lopd.sections import MAX_GPUS, MAX_SECONDS, Section

MAX_INT32 = 2**31 - 1
"""Kubernetes int32 fields (backoffLimit, ttlSecondsAfterFinished, runAsUser) stay below this."""

IMAGE_RE = re.compile(r"^[a-z0-9]+([._/:-][a-zA-Z0-9]+)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Toleration(Section):
    """A Kubernetes pod toleration (core/v1 Toleration)."""

    key: str | None = None
    """Taint key to tolerate; None with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Exists"
    """Exists (any value) or Equal (``value`` must match)."""
    value: str | None = None
    """Taint value when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; None tolerates all effects."""
    toleration_seconds: int | None = Field(None, ge=0, le=MAX_SECONDS)
    """NoExecute only: how long the pod stays bound after the taint appears (at most 10^9 s)."""


class TeacherServerConfig(Section):
    """The vLLM teacher Deployment + Service that online (standard) OPD scores against."""

    enabled: bool = True
    """Deploy the teacher server with the ``opd`` stage when ``opd.mode`` is online (and
    ``opd.online.teacher_url`` is unset); the CLI points ``teacher_url`` at its Service."""
    gpus: int = Field(8, ge=0, le=MAX_GPUS)
    """``nvidia.com/gpu`` of the teacher pod (also its tensor parallel size when > 0; at most 1024)."""
    cpu: str = "32"
    """CPU request of the teacher pod."""
    memory: str = "400Gi"
    """Memory request of the teacher pod."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the OpenAI-compatible server (1 to at most 65535)."""
    replicas: int = Field(1, ge=1, le=64)
    """Teacher pods behind the Service (each with ``gpus`` GPUs; at most 64)."""
    pod_monitor: bool = False
    """Create a Prometheus Operator PodMonitor scraping vLLM's ``/metrics`` (needs its CRDs)."""


class KubernetesConfig(Section):
    """Where and how the stages run on a cluster (defaults: an 8×H100 node pool)."""

    namespace: str = "lopd"
    """Namespace of every release (see manifests/namespace.yaml)."""
    image: str = "ghcr.io/lopd/lopd:0.1.0"
    """Container image of all stages (``repository:tag`` or ``repository@sha256:…``); built by ``make image``."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy."""
    image_pull_secrets: list[str] = []
    """Names of Secrets for a private registry."""
    service_account: str | None = None
    """Existing ServiceAccount for the pods; None makes the chart create one per release
    (annotated with ``irsa_role_arn`` when set)."""
    irsa_role_arn: str | None = None
    """EKS IAM role for service accounts (``eks.amazonaws.com/role-arn``): S3 access without keys."""
    storage_secret: str | None = "lopd-storage"
    """Secret whose keys become the pods' environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …;
    see manifests/storage-secret.example.yaml); None when the ServiceAccount (IRSA) suffices."""
    node_selector: dict[str, str] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    """Node labels the pods require (the GPU pool)."""
    tolerations: list[Toleration] = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    """Tolerations for the GPU pool's taints."""
    queue: str | None = None
    """Kueue LocalQueue name (``kueue.x-k8s.io/queue-name`` label); None submits without Kueue."""
    priority_class: str | None = None
    """PriorityClass of the pods; None uses the cluster default."""
    workload_priority_class: str | None = None
    """Kueue WorkloadPriorityClass (``kueue.x-k8s.io/priority-class`` label; needs ``queue``):
    the order and preemption of the run's workloads in the queue; None uses Kueue's default."""
    driver_service_account: str = "lopd-deployer"
    """ServiceAccount of the in-cluster pipeline driver (``lopd pipeline --backend k8s --detach``);
    manifests/rbac.yaml binds it to the Role it needs."""
    store_egress_cidrs: list[str] = ["0.0.0.0/0"]
    """Eval pods' NetworkPolicy: the address ranges of the artifact store (with DNS, all they may reach)."""
    store_egress_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field([443], min_length=1, max_length=16)
    """Eval pods' NetworkPolicy: the artifact store's TCP ports (each at most 65535; at most 16 ports)."""
    ttl_seconds_after_finished: int | None = Field(86400, ge=0, le=MAX_INT32)
    """Delete finished Jobs (and their pods) after this many seconds (at most 2^31-1); None keeps them."""
    backoff_limit: int = Field(3, ge=0, le=10**4)
    """Pod failures before the Job fails (preemptions and evictions do not count; at most 10^4)."""
    run_as_user: int = Field(1000, ge=1, le=MAX_INT32)
    """Non-root UID of the containers (the image's ``lopd`` user; at most 2^31-1)."""
    cache_size: str = "200Gi"
    """Size limit of the model/HF cache volume (an emptyDir unless ``cache_pvc`` is set)."""
    cache_pvc: str | None = None
    """Existing PersistentVolumeClaim for HF_HOME and the lopd cache (shared across stages)."""
    teacher_server: TeacherServerConfig = TeacherServerConfig()
    """Online OPD only: the live teacher."""

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not IMAGE_RE.match(v):
            raise ValueError(f"{v!r} is not an image reference (registry/repository:tag)")
        return v

    @field_validator("namespace", "service_account", "storage_secret", "queue", "priority_class", "cache_pvc",
                     "workload_priority_class", "driver_service_account")
    @classmethod
    def _dns_label(cls, v: str | None) -> str | None:
        if v is not None and not DNS_LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid Kubernetes name (lowercase letters, digits, '-', <= 63 chars)")
        return v

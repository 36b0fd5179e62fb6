"""Recipe -> the chart's values for one stage (pure functions; no Helm, no cluster).

``stage_values(recipe, stage)`` is what ``lopd render`` prints and ``lopd deploy`` installs:
resources from ``<stage>.resources``, shard count from ``<stage>.shards``, cluster settings from
``recipe.kubernetes``, and the resolved recipe itself (mounted into the pods as a ConfigMap).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from lopd.k8s import K8sError
from lopd.recipe import Recipe, RecipeError, validate_recipe
from lopd.stages import get as get_stage
from lopd.stages import rounds, split

MAX_RELEASE = 53  # Helm's release-name limit


def release_name(run_id: str, stage: str) -> str:
    """``lopd-<run>-<stage>``; a run id too long for Helm's 53 characters is cut and suffixed
    with a short hash of the full id, so names stay unique and stable."""
    name = f"lopd-{run_id}-{stage}"
    if len(name) <= MAX_RELEASE:
        return name
    h = hashlib.sha256(run_id.encode()).hexdigest()[:6]
    keep = MAX_RELEASE - len(f"lopd--{h}-{stage}")
    return f"lopd-{run_id[:keep].rstrip('-')}-{h}-{stage}"


def stage_section(recipe: Recipe, stage: str) -> Any:
    """The recipe section of ``stage``; a one-line error when the recipe has none."""
    spec = get_stage(stage)
    section = spec.of(recipe)
    if section is None:
        raise RecipeError(f"recipe error: {spec.section}: the recipe has no such section, so no {stage} stage")
    if split(stage)[1] > rounds(recipe):
        raise RecipeError(f"recipe error: opd.rounds is {rounds(recipe)}, so the run has no stage {stage}")
    return section


def split_image(ref: str) -> tuple[str, str, str]:
    """``repo[:tag][@sha256:…]`` -> (repository, tag, digest); the tag defaults to ``latest``."""
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    m = re.fullmatch(r"(.+?)(?::([\w][\w.-]{0,127}))?", ref)
    assert m is not None
    repo, tag = m.group(1), m.group(2) or "latest"
    if "/" in tag:  # a registry port, not a tag: host:5000/repo
        repo, tag = ref, "latest"
    return repo, tag, digest


def teacher_server_name(release: str) -> str:
    return f"{release}-teacher"[:63].rstrip("-")


def online_teacher(recipe: Recipe, stage: str) -> bool:
    """Whether this stage gets a vLLM teacher Deployment (online OPD without a teacher_url)."""
    return (stage == "opd" and recipe.opd.mode == "online" and recipe.opd.online.teacher_url is None
            and recipe.kubernetes.teacher_server.enabled)


def pod_recipe(recipe: Recipe, stage: str) -> str:
    """The recipe YAML the pods read: the keys the recipe file and ``--set`` gave (defaults are
    filled in by the same lopd inside the image, so the pods resolve exactly ``recipe``), plus the
    teacher Service URL for online OPD. Checked: it re-validates to ``recipe``'s fingerprint."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    if online_teacher(recipe, stage):
        ts = recipe.kubernetes.teacher_server
        url = f"http://{teacher_server_name(release_name(recipe.run_id, stage))}:{ts.port}/v1"
        data.setdefault("opd", {}).setdefault("online", {})["teacher_url"] = url
        validate_recipe(data)
    elif validate_recipe(data).sha256() != recipe.sha256():  # pragma: no cover - pydantic round trip
        raise K8sError("internal: the recipe does not round-trip through its set keys")
    return yaml.safe_dump(data, sort_keys=False)


def stage_values(recipe: Recipe, stage: str) -> dict[str, Any]:
    """Helm values of ``helm/lopd`` for one stage of ``recipe`` (see helm/lopd/values.yaml)."""
    section = stage_section(recipe, stage)
    k = recipe.kubernetes
    res = section.resources
    repo, tag, digest = split_image(k.image)
    spec, round = get_stage(stage), split(stage)[1]
    if not spec.training and res.nodes != 1:
        raise RecipeError(f"recipe error: {spec.section}.resources.nodes: inference stages run one pod per "
                          f"shard; use {spec.section}.shards instead (got {res.nodes})")
    ts = k.teacher_server
    values: dict[str, Any] = {
        "stage": stage,
        "module": spec.entrypoint,
        "training": spec.training,
        "runId": recipe.run_id,
        "storeUri": recipe.store,
        "image": {"repository": repo, "tag": tag, "digest": digest, "pullPolicy": k.image_pull_policy},
        "imagePullSecrets": list(k.image_pull_secrets),
        "recipe": {"content": pod_recipe(recipe, stage)},
        "storage": {"secret": {"enabled": k.storage_secret is not None,
                               "name": k.storage_secret or "lopd-storage"}},
        "serviceAccount": {"enabled": k.service_account is None, "name": k.service_account or "",
                           "irsaRoleArn": k.irsa_role_arn or "", "annotations": {}},
        "shards": spec.shards(recipe),
        "resources": {"nodes": res.nodes, "gpusPerNode": res.gpus_per_node, "cpu": res.cpu,
                      "memory": res.memory, "shmSize": res.shm_size},
        "job": {"backoffLimit": k.backoff_limit, "maxFailedIndexes": None,
                "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
                "activeDeadlineSeconds": res.active_deadline_seconds, "parallelism": 0,
                "extraArgs": ["--round", str(round)] if round > 1 else []},
        "nodeSelector": dict(k.node_selector),
        "tolerations": [{_camel(f): v for f, v in t.model_dump().items() if v is not None}
                        for t in k.tolerations],
        "priorityClassName": k.priority_class or "",
        "kueue": {"enabled": k.queue is not None, "queueName": k.queue or "lopd",
                  "priorityClass": k.workload_priority_class or ""},
        "networkPolicy": {"enabled": stage == "eval",
                          "storeEgress": {"cidrs": list(k.store_egress_cidrs), "ports": list(k.store_egress_ports)}},
        "securityContext": {"runAsUser": k.run_as_user, "runAsGroup": k.run_as_user, "fsGroup": k.run_as_user},
        "cache": {"sizeLimit": k.cache_size, "existingClaim": k.cache_pvc or ""},
        "env": [],
        "teacher": {"enabled": online_teacher(recipe, stage), "model": recipe.models.teacher.uri,
                    "gpus": ts.gpus, "cpu": ts.cpu, "memory": ts.memory, "port": ts.port,
                    "replicas": ts.replicas, "podMonitor": {"enabled": ts.pod_monitor, "interval": "30s"}},
    }
    return values


def driver_values(recipe: Recipe) -> dict[str, Any]:
    """Values of the pipeline driver's release (``driver.enabled``): the first stage's cluster
    settings and the recipe, the ``lopd-deployer`` ServiceAccount, no GPU, no Kueue queue."""
    from lopd.stages import stages_of

    values = stage_values(recipe, stages_of(recipe)[0])
    k = recipe.kubernetes
    values.update(stage="driver", training=False, shards=1, recipe={"content": pod_recipe(recipe, "driver")},
                  serviceAccount={"enabled": False, "name": k.driver_service_account, "irsaRoleArn": "",
                                  "annotations": {}},
                  networkPolicy={**values["networkPolicy"], "enabled": False},
                  teacher={**values["teacher"], "enabled": False},
                  driver={"enabled": True, "serviceAccountName": k.driver_service_account, "pollSeconds": 30,
                          "backoffLimit": 6, "activeDeadlineSeconds": None, "cpu": "1", "memory": "2Gi"})
    values["kueue"]["enabled"] = False
    return values


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe) as ``|`` blocks, so a values file reads like the recipe."""


def _str(dumper: yaml.SafeDumper, s: str):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_LiteralDumper.add_representer(str, _str)


def values_yaml(values: dict[str, Any]) -> str:
    return yaml.dump(values, Dumper=_LiteralDumper, sort_keys=False, allow_unicode=True)

"""Validate rendered objects: core kinds with ``kubernetes-validate --strict`` (unknown fields are
errors), custom resources against their CRD's openAPIV3Schema made strict the same way.

The PyTorchJob CRD (kubeflow training-operator v1.9.4) ships with the package, in
``lopd/k8s/schemas/kubeflow.org_pytorchjobs.yaml``, with schemas of the Kueue v1beta2 kinds of
manifests/kueue.yaml and of the Prometheus Operator's PodMonitor (the fields lopd uses); they
are read with :mod:`importlib.resources` (so they are found in a wheel, an editable install and
the image alike).
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lopd.k8s import K8sError

CRD_DIR = resources.files("lopd.k8s").joinpath("schemas")
"""The packaged CRD schemas (an :mod:`importlib.resources` traversable; ``crd_dir`` arguments may
name another directory)."""
CRDS = {("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
        ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "kueue.x-k8s.io_resourceflavors.yaml",
        ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): "kueue.x-k8s.io_clusterqueues.yaml",
        ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
        ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): "kueue.x-k8s.io_workloadpriorityclasses.yaml",
        ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml"}
KUBE_VERSION = "1.31.0"


class ManifestInvalid(K8sError):
    """A rendered object that the API server would reject."""


def strict_schema(node: Any) -> Any:
    """A CRD's structural schema as a JSON schema that rejects unknown fields: every object with
    ``properties`` and no ``additionalProperties`` / ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false``; ``x-kubernetes-int-or-string`` becomes integer-or-string."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(api_version: str, kind: str, crd_dir: str | None = None):
    """A jsonschema validator for a custom resource, from its CRD file (in ``crd_dir``, by default
    the packaged :data:`CRD_DIR`)."""
    import jsonschema

    fname = CRDS.get((api_version, kind))
    path = (Path(crd_dir) if crd_dir is not None else CRD_DIR).joinpath(fname) if fname else None
    if path is None or not path.is_file():
        raise ManifestInvalid(f"no CRD schema for {api_version} {kind} (looked for {path})")
    crd = next(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    version = api_version.split("/")[-1]
    spec = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict_schema(copy.deepcopy(spec["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def validate_object(obj: dict[str, Any], kube_version: str = KUBE_VERSION, crd_dir: Path | None = None) -> str:
    """Validate one object; returns ``kind/name`` or raises :class:`ManifestInvalid` naming the field."""
    kind, api = obj.get("kind"), obj.get("apiVersion")
    name = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    if (api, kind) in CRDS:
        validator = crd_validator(api, kind, None if crd_dir is None else str(crd_dir))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            raise ManifestInvalid(f"{name}: {_where(e.absolute_path)}: {e.message}")
        return name
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise ManifestInvalid(f"{name}: {_where(e.absolute_path)}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise ManifestInvalid(f"{name}: {e.message}") from None
    return name


def validate_objects(objs: list[dict[str, Any]], kube_version: str = KUBE_VERSION,
                     crd_dir: Path | None = None) -> list[str]:
    return [validate_object(o, kube_version, crd_dir) for o in objs]

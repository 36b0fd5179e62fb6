"""Helm: render and lint through Helm's own engine (helm-python-sdk, offline), and
``helm upgrade --install`` with the ``helm`` binary when it is on PATH, else through the SDK.

helm-python-sdk (import name ``helm_python``) binds ``libhelm_c``, a C ABI over Helm v4's Go
SDK, shipped inside the wheel: no helm binary, Go toolchain or network is needed to render,
lint or validate values against ``values.schema.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lopd.k8s import CHART_DIR, K8sError

NOTES = "NOTES.txt"


def _helm():
    try:
        import helm_python
    except ImportError as e:  # pragma: no cover - dev/k8s extra
        raise K8sError("helm-python-sdk is not installed: pip install 'lopd[k8s]'") from e
    return helm_python


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def render(values: dict[str, Any], release: str, namespace: str, chart: Path = CHART_DIR) -> dict[str, str]:
    """Render the chart with ``values`` (validated against values.schema.json first): template
    path -> rendered text, empty templates dropped, NOTES.txt included."""
    helm = _helm()
    try:
        with helm.Chart.load(str(chart)) as c:
            c.validate_schema(values)
            out = c.render(values, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as e:
        raise K8sError(f"helm: {_one_line(e)}") from None
    return {k: v for k, v in sorted(out.items()) if v.strip()}


def render_stage(recipe, stage: str, validate: bool = True) -> tuple[dict[str, Any], str, dict[str, str]]:
    """One stage of ``recipe`` through the chart: (values, release name, rendered templates), the
    objects validated against the Kubernetes and PyTorchJob schemas unless ``validate`` is off."""
    from lopd.k8s.validate import validate_objects
    from lopd.k8s.values import release_name, stage_values

    values = stage_values(recipe, stage)
    release = release_name(recipe.run_id, stage)
    rendered = render(values, release, recipe.kubernetes.namespace)
    if validate:
        validate_objects(objects(rendered))
    return values, release, rendered


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt left out), in template order."""
    objs = []
    for path, text in rendered.items():
        if path.endswith(NOTES):
            continue
        objs.extend(d for d in yaml.safe_load_all(text) if d)
    return objs


def notes(rendered: dict[str, str]) -> str:
    return next((t for p, t in rendered.items() if p.endswith(NOTES)), "")


def manifests_text(rendered: dict[str, str]) -> str:
    """A deterministic multi-document YAML of the rendered objects (``# Source:`` headers)."""
    docs = []
    for path, text in rendered.items():
        if path.endswith(NOTES):
            continue
        for chunk in text.split("\n---"):
            if chunk.strip():
                docs.append(f"---\n# Source: {path}\n{chunk.strip(chr(10))}\n")
    return "".join(docs)


def lint(values: dict[str, Any] | None = None, chart: Path = CHART_DIR, kube_version: str = "v1.31.0",
         namespace: str = "lopd") -> list[dict[str, Any]]:
    """``helm lint --strict``: the findings (severity 1 info, 2 warning, 3 error) plus errors."""
    report = _helm().lint(str(chart), values, strict=True, namespace=namespace, kube_version=kube_version)
    return report.get("messages", []) + [{"severity": 3, "path": "", "error": e} for e in report.get("errors", [])]


def upgrade_install(values: dict[str, Any], release: str, namespace: str, chart: Path = CHART_DIR,
                    timeout: int = 300) -> str:
    """``helm upgrade --install``; returns how it was done (helm binary or SDK) and the revision."""
    render(values, release, namespace, chart)  # schema + template errors before touching the cluster
    binary = shutil.which("helm")
    if binary:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            json.dump(values, f)
            f.flush()
            cmd = [binary, "upgrade", "--install", release, str(chart), "--namespace", namespace,
                   "--values", f.name, "--history-max", "5", "--timeout", f"{timeout}s"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise K8sError(f"helm upgrade --install {release}: {_hint(proc.stderr.strip().splitlines()[-1:])}")
        return f"helm binary: {release} installed in {namespace}"
    helm = _helm()
    try:
        with helm.Config(namespace=namespace) as cfg:
            try:
                rel = cfg.upgrade(str(chart), release, values, namespace=namespace, timeout=timeout, max_history=5)
            except helm.HelmNotFoundError:
                rel = cfg.install(str(chart), release, values, namespace=namespace, timeout=timeout)
    except helm.HelmError as e:
        raise K8sError(f"helm upgrade --install {release}: {_hint([_one_line(e)])}") from None
    return f"helm-python-sdk: {release} revision {rel.get('version', rel.get('revision', '?'))} in {namespace}"


def _hint(lines: list[str]) -> str:
    msg = " ".join(lines) or "failed"
    if "field is immutable" in msg:
        msg += " (a Job's pod template cannot change in place: `helm uninstall` the release, then deploy again)"
    return msg

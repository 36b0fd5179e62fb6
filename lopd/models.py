"""Models as stages use them: a reference (published artifact, local directory or hub id)
made local and fingerprinted, with the lineage its manifest carries.

:func:`resolve_model` is what every stage calls for its teacher, student or checkpoints
(``StageContext.resolve_model`` in :mod:`lopd.stage`); errors name the recipe field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.fingerprint import HUB_ID_RE, fingerprint_hub, fingerprint_local, fingerprint_manifest
from lopd.layout import MANIFEST
from lopd.manifest import InputRef, Manifest, ManifestError, fetch, read_manifest
from lopd.recipe import ModelSpec
from lopd.store import cache_dir, is_store_uri, open_store


class ModelNotFoundError(LopdError):
    """A model reference that is neither a published artifact, a directory nor a hub id."""


@dataclass
class ResolvedModel:
    """A model made local: ``path`` is an HF directory that transformers and vLLM load."""

    ref: str
    path: Path
    fingerprint: str
    manifest: Manifest | None = None
    manifest_sha256: str | None = None

    @property
    def lineage(self) -> dict[str, Any]:
        """The model's own manifest lineage (empty for a bare directory or hub id)."""
        return dict(self.manifest.lineage) if self.manifest else {}

    def input_ref(self) -> InputRef:
        return InputRef(uri=self.ref, manifest_sha256=self.manifest_sha256)


def resolve_model(ref: str | ModelSpec, field_name: str = "model") -> ResolvedModel:
    """Make a model local and fingerprint it.

    - ``s3://…`` of a published artifact: its manifest is read, its files are fetched
      (verified, via the sha256 cache) into ``$LOPD_CACHE/models/<sha>``;
    - a local directory (a path or ``file://…``) with ``config.json``: used in place,
      fingerprinted from its files (or its MANIFEST.json hashes when they match the sizes),
      its MANIFEST.json lineage (e.g. an SFT checkpoint's teacher) carried along;
    - a hub id ``org/name``: ``huggingface_hub.snapshot_download`` at the spec's revision.

    Errors name ``field_name`` (e.g. ``models.teacher.uri``) and the reference.
    """
    revision = None
    if isinstance(ref, ModelSpec):
        ref, revision = ref.uri, ref.revision
    if is_store_uri(ref) and not ref.startswith("file://"):  # a file:// artifact is read in place below
        store = open_store(ref)
        try:
            m, sha = read_manifest(store)
        except ManifestError as e:
            raise ModelNotFoundError(f"{field_name}: model {ref!r} not found ({e})") from None
        if not any(f.path == "config.json" for f in m.files):
            raise ModelNotFoundError(f"{field_name}: {ref!r} is an artifact but not a model (no config.json)")
        dest = fetch(store, "", cache_dir() / "models" / sha[:32], m)
        return ResolvedModel(ref, dest, fingerprint_manifest(m), m, sha)
    path = Path(ref[7:] if ref.startswith("file://") else ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{field_name}: {ref!r} is a directory but not a model (no config.json)")
        m = sha = None
        if (path / MANIFEST).is_file():
            raw = (path / MANIFEST).read_bytes()
            try:
                m, sha = Manifest.model_validate_json(raw), hashlib.sha256(raw).hexdigest()
            except ValueError:
                m = sha = None
        return ResolvedModel(ref, path, fingerprint_local(path), m, sha)
    if HUB_ID_RE.match(ref) and not path.exists() and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            fp, commit = fingerprint_hub(ref, revision)
            local = snapshot_download(ref, revision=commit)
        except LopdError as e:
            raise ModelNotFoundError(f"{field_name}: {e}") from None
        except Exception as e:  # hub errors: offline, gated, missing
            raise ModelNotFoundError(f"{field_name}: hub model {ref!r} unavailable ({str(e).splitlines()[0]})") \
                from None
        return ResolvedModel(ref, Path(local), fp)
    raise ModelNotFoundError(f"{field_name}: model {ref!r} not found (not a published store URI, "
                             "a model directory, or a hub id)")

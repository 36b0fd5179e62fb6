"""Model fingerprints: which model (config + weights) a checkpoint, directory or hub id is.

A fingerprint is a sha256 over the sorted (path, sha256) pairs of ``config.json`` and the weight
files, so the same weights fingerprint the same in a local directory and published (read from
the manifest, no download); a hub model's is over ``hub:<id>@<commit>``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import ValidationError

from lopd.layout import MANIFEST
from lopd.manifest import FileEntry, Manifest, ManifestError, read_manifest
from lopd.store import is_store_uri, open_store, sha256_file

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
FINGERPRINT_FILES = ("config.json",)


def _is_weight(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS)


def _fingerprint_of(entries: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of config + weights."""
    h = hashlib.sha256(b"lopd-model-fingerprint-v1\n")
    for path, sha in sorted(entries):
        h.update(f"{path}\t{sha}\n".encode())
    return h.hexdigest()


def model_files(entries: list[FileEntry]) -> list[tuple[str, str]]:
    sel = [(f.path, f.sha256) for f in entries if f.path in FINGERPRINT_FILES or _is_weight(f.path)]
    if not any(_is_weight(p) for p, _ in sel):
        raise ManifestError("model has no weight files (*.safetensors, *.bin, ...)")
    return sel


def fingerprint_local(path: str | Path, use_manifest: bool = True) -> str:
    """Fingerprint of a local HF model directory: config.json + weight files, hashed streaming.

    When the directory carries a MANIFEST.json whose recorded sizes and mtimes-independent
    hashes cover the files, the recorded hashes are reused (a size check guards staleness);
    otherwise each file is hashed.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ManifestError(f"{path}: not a model directory (no config.json)")
    recorded: dict[str, FileEntry] = {}
    if use_manifest and (path / MANIFEST).is_file():
        try:
            m = Manifest.model_validate_json((path / MANIFEST).read_bytes())
            recorded = {f.path: f for f in m.files}
        except ValidationError:
            recorded = {}
    entries = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if not p.is_file() or not (rel in FINGERPRINT_FILES or _is_weight(rel)):
            continue
        rec = recorded.get(rel)
        size = p.stat().st_size
        entries.append(FileEntry(path=rel, bytes=size, sha256=rec.sha256 if rec and rec.bytes == size
                                 else sha256_file(p)))
    return _fingerprint_of(model_files(entries))


def fingerprint_manifest(m: Manifest) -> str:
    """Fingerprint of a published model from its manifest's file hashes (no download)."""
    return _fingerprint_of(model_files(m.files))


HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def fingerprint_hub(repo_id: str, revision: str | None = None) -> tuple[str, str]:
    """(fingerprint, resolved commit) of a hub model: sha256 over ``hub:<id>@<commit>``.

    The commit is resolved from the local HF cache first (offline-safe), else from the hub.
    """
    commit = resolve_hub_revision(repo_id, revision)
    h = hashlib.sha256(f"lopd-model-fingerprint-v1\nhub:{repo_id}@{commit}\n".encode())
    return h.hexdigest(), commit


def resolve_hub_revision(repo_id: str, revision: str | None = None) -> str:
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / rev
    if ref.is_file():
        return ref.read_text().strip()
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=rev)
    except Exception as e:
        raise ManifestError(f"cannot resolve hub model {repo_id}@{rev}: {str(e).splitlines()[0]}") from None
    return info.sha


def fingerprint(ref: str, revision: str | None = None) -> str:
    """Fingerprint of a model given as a store URI, a local directory or a hub id."""
    if is_store_uri(ref):
        store = open_store(ref)
        try:
            m, _ = read_manifest(store)
        except ManifestError:
            if ref.startswith("file://") and Path(ref[7:]).is_dir():
                return fingerprint_local(ref[7:])
            raise
        return fingerprint_manifest(m)
    if Path(ref).exists():
        return fingerprint_local(ref)
    if HUB_ID_RE.match(ref):
        return fingerprint_hub(ref, revision)[0]
    raise ManifestError(f"model {ref!r}: not a store URI, an existing directory, or a hub id")


__all__ = [
    "FINGERPRINT_FILES", "HUB_ID_RE", "WEIGHT_PATTERNS", "fingerprint", "fingerprint_hub", "fingerprint_local",
    "fingerprint_manifest", "model_files", "resolve_hub_revision",
]

"""Model fingerprints: which model (config + weights) a checkpoint, directory or hub id is.

A fingerprint is a sha256 over the sorted (path, content digest) pairs of ``config.json`` and
the weight files, so the same weights fingerprint the same in a local directory and published
(read from the manifest, no download); a hub model's is over ``hub:<id>@<commit>``. Digests are
BLAKE3 (:mod:`lopd.store.common`); a model published by an older lopd, whose manifest records
sha256 digests, fingerprints differently from the same files hashed here (republish it, or
resume with ``--force``).

A local directory's fingerprint always rests on its files' content. A MANIFEST.json beside the
files is never taken on trust (a weight file overwritten in place keeps its size); hashes are
reused only from the stat cache (:func:`hash_local`), which records each hash together with
the file's :func:`stat_signature` at the time it was computed. :func:`verify_local` rehashes a
directory against its manifest (``lopd verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from lopd.layout import MANIFEST
from lopd.manifest import FileEntry, Manifest, ManifestError, read_manifest
from lopd.store import ALGORITHM, algorithm_of, cache_dir, file_digest, is_store_uri, open_store, stat_signature

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
FINGERPRINT_FILES = ("config.json",)


def _is_weight(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS)


def _fingerprint_of(entries: list[tuple[str, str]]) -> str:
    """sha256 over the sorted (relative path, file digest) pairs of config + weights."""
    h = hashlib.sha256(b"lopd-model-fingerprint-v2\n")
    for path, digest in sorted(entries):
        h.update(f"{path}\t{digest}\n".encode())
    return h.hexdigest()


def model_files(entries: list[FileEntry]) -> list[tuple[str, str]]:
    sel = [(f.path, f.digest) for f in entries if f.path in FINGERPRINT_FILES or _is_weight(f.path)]
    if not any(_is_weight(p) for p, _ in sel):
        raise ManifestError("model has no weight files (*.safetensors, *.bin, ...)")
    return sel


# --------------------------------------------------------------------------- stat cache


def _cache_file(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "stat" / f"{key}.json"


def _load_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(_cache_file(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, data: dict[str, dict]) -> None:
    """Write the directory's stat cache atomically; a read-only cache only costs rehashing."""
    f = _cache_file(path)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, f)
    except OSError:
        pass


def hash_local(path: str | Path, rels: list[str], use_cache: bool = True,
               algorithms: dict[str, str] | None = None) -> dict[str, FileEntry]:
    """FileEntry (size, digest) of each existing file ``rels`` under ``path``, hashed with
    ``algorithms[rel]`` (default BLAKE3).

    With ``use_cache`` a digest recorded earlier is reused only when the file's
    :func:`stat_signature` is exactly the one recorded with it (and the algorithm is the one
    asked for); every other file is hashed (streamed) and its signature recorded.
    """
    algorithms = algorithms or {}
    path = Path(path)
    cache = _load_cache(path) if use_cache else {}
    out, changed = {}, False
    for rel in rels:
        p = path / rel
        if not p.is_file():
            continue
        sig = stat_signature(p)
        rec = cache.get(rel)
        algorithm = algorithms.get(rel, ALGORITHM)
        if (isinstance(rec, dict) and rec.get("sig") == sig and isinstance(rec.get("digest"), str)
                and rec["digest"].startswith(f"{algorithm}:")):
            digest = rec["digest"]
        else:
            digest = file_digest(p, algorithm)
            if stat_signature(p) == sig:  # not written to while being hashed
                cache[rel], changed = {"sig": sig, "digest": digest}, True
        out[rel] = FileEntry(path=rel, bytes=sig[0], digest=digest)
    if changed:
        _save_cache(path, {**_load_cache(path), **cache})
    return out


def remember_hashes(path: str | Path, entries: list[FileEntry]) -> None:
    """Record ``entries``' hashes under the files' current stat signatures, for files just
    written and verified against those hashes (a fetched artifact), when their sizes agree."""
    path = Path(path)
    cache = _load_cache(path)
    for f in entries:
        p = path / f.path
        if p.is_file() and (sig := stat_signature(p))[0] == f.bytes:
            cache[f.path] = {"sig": sig, "digest": f.digest}
    _save_cache(path, cache)


def _model_rels(path: Path) -> list[str]:
    return [rel for p in sorted(path.rglob("*"))
            if p.is_file() and ((rel := p.relative_to(path).as_posix()) in FINGERPRINT_FILES or _is_weight(rel))]


# --------------------------------------------------------------------------- fingerprints


def fingerprint_local(path: str | Path, use_cache: bool = True) -> str:
    """Fingerprint of a local HF model directory from the content of config.json and its weight
    files (hashed streaming, or taken from the stat cache: see :func:`hash_local`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ManifestError(f"{path}: not a model directory (no config.json)")
    return _fingerprint_of(model_files(list(hash_local(path, _model_rels(path), use_cache).values())))


def verify_local(path: str | Path, use_cache: bool = False) -> list[str]:
    """Compare a local directory with its MANIFEST.json, rehashing every file (``use_cache``:
    trust hashes recorded under an unchanged stat signature). Returns one line per problem:
    ``<file>: missing``, ``<file>: N bytes, manifest says M``, ``<file>: content differs from the
    manifest (digest …)``, ``<file>: not listed in the manifest``. Raises :class:`ManifestError` when
    there is no readable manifest."""
    path = Path(path)
    m = read_local_manifest(path)
    listed = {f.path: f for f in m.files}
    present = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    got = hash_local(path, [r for r in present if r in listed], use_cache,
                     {rel: algorithm_of(f.digest) for rel, f in listed.items()})
    problems = []
    for rel, want in sorted(listed.items()):
        have = got.get(rel)
        if have is None:
            problems.append(f"{rel}: missing")
        elif have.bytes != want.bytes:
            problems.append(f"{rel}: {have.bytes} bytes, manifest says {want.bytes}")
        elif have.digest != want.digest:
            problems.append(f"{rel}: content differs from the manifest "
                            f"(digest {have.digest}, the manifest's {want.digest})")
    problems += [f"{rel}: not listed in the manifest" for rel in present if rel not in listed]
    return problems


def read_local_manifest(path: str | Path) -> Manifest:
    """The MANIFEST.json of a local directory; :class:`ManifestError` (naming it) if absent or bad."""
    m, _ = read_manifest(open_store(str(Path(path).resolve())))
    return m


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
        if ref.startswith("file://") and (Path(ref[7:]) / "config.json").is_file():
            return fingerprint_local(ref[7:])  # local files: their content, not the manifest's word
        return fingerprint_manifest(m)
    if Path(ref).exists():
        return fingerprint_local(ref)
    if HUB_ID_RE.match(ref):
        return fingerprint_hub(ref, revision)[0]
    raise ManifestError(f"model {ref!r}: not a store URI, an existing directory, or a hub id")


__all__ = [
    "FINGERPRINT_FILES", "HUB_ID_RE", "WEIGHT_PATTERNS", "fingerprint", "fingerprint_hub", "fingerprint_local",
    "fingerprint_manifest", "hash_local", "model_files", "read_local_manifest", "remember_hashes",
    "resolve_hub_revision", "stat_signature", "verify_local",
]

"""Manifests, model fingerprints and the teacher-consistency check.

A stage's output under ``<store>/runs/<run_id>/<stage>/`` exists iff its ``MANIFEST.json``
exists; the manifest is written last, after every file it lists. Sharded stages write
``shards/<i>-of-<n>/MANIFEST.json`` per shard, and whichever shard finishes last writes the
stage manifest (deterministic bytes, so two writers racing write the same thing).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lopd import LopdError, __version__
from lopd.store import IntegrityError, NotFound, Store, StoreError, is_store_uri, open_store, sha256_file

MANIFEST = "MANIFEST.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
FINGERPRINT_FILES = ("config.json",)


class ManifestError(LopdError):
    """A manifest is missing, malformed, or does not match the files it lists."""


class TeacherMismatchError(LopdError):
    """The scoring teacher is not the teacher the SFT data came from."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InputRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    manifest_sha256: str | None = None


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    count: int = Field(ge=1)


class Manifest(BaseModel):
    """What DESIGN.md's 'Artifacts' section lists, plus the shard (for shard manifests)."""

    model_config = ConfigDict(extra="forbid")
    stage: str
    run_id: str
    created_at: str
    recipe_sha256: str | None = None
    inputs: dict[str, InputRef] = {}
    files: list[FileEntry] = []
    lineage: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    lopd_version: str = __version__
    shard: ShardInfo | None = None

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise ManifestError(f"manifest of {self.stage} lists no file {path!r}")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def manifest_bytes(m: Manifest) -> bytes:
    return (json.dumps(m.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def read_manifest(store: Store, prefix: str = "", verify: bool = False) -> tuple[Manifest, str]:
    """Read ``prefix/MANIFEST.json``; returns (manifest, sha256 of its bytes).

    Raises :class:`ManifestError` when it is absent (the prefix is then not an artifact, even
    if files are there), malformed, or (``verify=True``) when a listed file is missing or its
    size or sha256 differs.
    """
    key = f"{prefix.strip('/')}/{MANIFEST}" if prefix.strip("/") else MANIFEST
    try:
        raw = store.read_bytes(key)
    except NotFound:
        raise ManifestError(f"no manifest at {store.url(key)}: the output is missing or incomplete") from None
    try:
        m = Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ManifestError(f"{store.url(key)}: malformed manifest ({loc}: {first['msg']})") from None
    if verify:
        verify_files(store, prefix, m)
    return m, hashlib.sha256(raw).hexdigest()


def verify_files(store: Store, prefix: str, m: Manifest) -> None:
    """Check that every listed file exists with the recorded size and sha256 (streamed)."""
    base = prefix.strip("/")
    listing = {o.key: o.size for o in store.list(base)}
    for f in m.files:
        key = f"{base}/{f.path}" if base else f.path
        if key not in listing:
            raise ManifestError(f"{store.url(key)}: listed in the manifest but missing")
        if listing[key] != f.bytes:
            raise ManifestError(f"{store.url(key)}: {listing[key]} bytes, manifest says {f.bytes}")
        got, _ = store.hash_object(key)
        if got != f.sha256:
            raise ManifestError(f"{store.url(key)}: sha256 {got} does not match the manifest's {f.sha256}")


def has_manifest(store: Store, prefix: str = "") -> bool:
    key = f"{prefix.strip('/')}/{MANIFEST}" if prefix.strip("/") else MANIFEST
    return store.exists(key)


def describe_dir(local: str | Path) -> list[FileEntry]:
    """FileEntry for every file under ``local`` (hashes streamed), sorted by path."""
    local = Path(local)
    return [
        FileEntry(path=p.relative_to(local).as_posix(), bytes=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(local.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]


def publish(store: Store, prefix: str, local_dir: str | Path, **fields: Any) -> Manifest:
    """Upload every file of ``local_dir`` under ``prefix``, then write the manifest last.

    ``fields`` are the Manifest fields other than ``files`` (stage, run_id, inputs, lineage,
    metrics, shard, recipe_sha256); ``created_at`` defaults to now.
    """
    files = describe_dir(local_dir)
    for f in files:
        store.put_file(Path(local_dir) / f.path, f"{prefix.strip('/')}/{f.path}")
    fields.setdefault("created_at", now())
    m = Manifest(files=files, **fields)
    store.write_bytes(f"{prefix.strip('/')}/{MANIFEST}", manifest_bytes(m))
    return m


def fetch(store: Store, prefix: str, dest: str | Path, m: Manifest | None = None) -> Path:
    """Materialise an artifact into ``dest`` from the sha256 cache, verifying every file.

    Files are hard-linked (or copied) from the cache; the manifest is copied beside them.
    """
    if m is None:
        m, _ = read_manifest(store, prefix)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = prefix.strip("/")
    for f in m.files:
        blob = store.fetch(f"{base}/{f.path}" if base else f.path, f.sha256, f.bytes)
        out = dest / f.path
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and out.stat().st_size == f.bytes and sha256_file(out) == f.sha256:
            continue
        out.unlink(missing_ok=True)
        try:
            os.link(blob, out)
        except OSError:
            import shutil

            shutil.copyfile(blob, out)
    (dest / MANIFEST).write_bytes(manifest_bytes(m))
    return dest


# --------------------------------------------------------------------------- shards


def shard_prefix(stage_prefix: str, index: int, count: int) -> str:
    if not 0 <= index < count:
        raise ManifestError(f"shard index {index} out of range for {count} shards (0..{count - 1})")
    return f"{stage_prefix.strip('/')}/shards/{index}-of-{count}"


def merge_metrics(shard_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum numeric metrics across shards; others are kept per shard."""
    out: dict[str, Any] = {}
    for m in shard_metrics:
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def finalize_shards(store: Store, stage_prefix: str, count: int) -> Manifest | None:
    """Write the stage manifest if all ``count`` shard manifests exist; else return None.

    Idempotent and race-safe: the stage manifest is a pure function of the shard manifests
    (``created_at`` is the latest shard's), so concurrent finishers write identical bytes.
    """
    stage_prefix = stage_prefix.strip("/")
    shards = []
    for i in range(count):
        sp = shard_prefix(stage_prefix, i, count)
        if not has_manifest(store, sp):
            return None
        m, sha = read_manifest(store, sp)
        if m.shard is None or (m.shard.index, m.shard.count) != (i, count):
            raise ManifestError(f"{store.url(sp)}: shard manifest says {m.shard}, expected {i}-of-{count}")
        shards.append((sp, m, sha))
    first = shards[0][1]
    for _, m, _ in shards[1:]:
        if m.recipe_sha256 != first.recipe_sha256 or m.lineage != first.lineage:
            raise ManifestError(f"{store.url(stage_prefix)}: shards disagree on recipe or lineage")
    rel = len(stage_prefix) + 1
    files = [FileEntry(path=f"{sp[rel:]}/{f.path}", bytes=f.bytes, sha256=f.sha256)
             for sp, m, _ in shards for f in m.files]
    stage = Manifest(
        stage=first.stage,
        run_id=first.run_id,
        created_at=max(m.created_at for _, m, _ in shards),
        recipe_sha256=first.recipe_sha256,
        inputs=first.inputs,
        files=files,
        lineage={**first.lineage, "shards": {sp[rel:]: sha for sp, _, sha in shards}},
        metrics=merge_metrics([m.metrics for _, m, _ in shards]),
    )
    store.write_bytes(f"{stage_prefix}/{MANIFEST}", manifest_bytes(stage))
    return stage


# --------------------------------------------------------------------------- fingerprints


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


# --------------------------------------------------------------------------- teacher consistency


def check_teacher_consistency(sft_teacher: str | None, scoring_teacher: str, allow_inconsistent: bool) -> dict:
    """The paper's condition: the teacher scoring the rollouts is the one that wrote the SFT data.

    ``sft_teacher`` is the fingerprint in the SFT checkpoint's lineage; ``scoring_teacher`` the
    fingerprint of the teacher about to score. Returns the lineage record to carry downstream;
    raises :class:`TeacherMismatchError` naming both fingerprints unless ``allow_inconsistent``.
    """
    consistent = sft_teacher is not None and sft_teacher == scoring_teacher
    if not consistent and not allow_inconsistent:
        if sft_teacher is None:
            raise TeacherMismatchError(
                "teacher consistency: the SFT checkpoint records no teacher fingerprint; "
                f"cannot check scoring teacher {scoring_teacher} "
                "(set allow_inconsistent_teacher: true only for the ablation)"
            )
        raise TeacherMismatchError(
            f"teacher consistency: SFT data came from teacher {sft_teacher} but the scoring "
            f"teacher is {scoring_teacher}; use the same teacher "
            "(set allow_inconsistent_teacher: true only for the ablation)"
        )
    return {
        "teacher_fingerprint": scoring_teacher,
        "sft_teacher_fingerprint": sft_teacher,
        "teacher_consistent": consistent,
        "allow_inconsistent_teacher": bool(allow_inconsistent),
    }


def stage_prefix(run_id: str, stage: str) -> str:
    """``runs/<run_id>/<stage>`` — where a stage's output lives under the store root."""
    return f"runs/{run_id}/{stage}"


__all__ = [
    "MANIFEST", "FileEntry", "InputRef", "IntegrityError", "Manifest", "ManifestError", "ShardInfo",
    "StoreError", "TeacherMismatchError", "check_teacher_consistency", "describe_dir", "fetch",
    "finalize_shards", "fingerprint", "fingerprint_hub", "fingerprint_local", "fingerprint_manifest",
    "has_manifest", "publish", "read_manifest", "shard_prefix", "stage_prefix", "verify_files",
]

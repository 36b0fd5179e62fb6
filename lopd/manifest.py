"""Stage manifests: what a published artifact is, and publishing, reading and fetching it.

A stage's output under ``<store>/runs/<run_id>/<stage>/`` exists iff its ``MANIFEST.json``
exists; the manifest is written last, after every file it lists. Sharded stages write
``shards/<i>-of-<n>/MANIFEST.json`` per shard, and whichever shard finishes last writes the
stage manifest (deterministic bytes, so two writers racing write the same thing). The paths
come from :mod:`lopd.layout` (which also defines :class:`ManifestError`, raised for a bad shard).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lopd import __version__
from lopd.layout import MANIFEST, ManifestError, manifest_key, shard_prefix
from lopd.store import DIGEST_PATTERN, NotFound, Store, algorithm_of, file_digest


class FileEntry(BaseModel):
    """One file of an artifact: its path under the stage prefix, size and content digest."""

    model_config = ConfigDict(extra="forbid")
    path: str
    bytes: int = Field(ge=0)
    digest: str = Field(pattern=DIGEST_PATTERN)
    """``blake3:<hex>`` for files lopd publishes; ``sha256:<hex>`` for a manifest written by an
    older lopd, whose entries recorded ``"sha256": "<hex>"`` (read as this field)."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_sha256(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sha256" in data and "digest" not in data and isinstance(data["sha256"], str):
            data = {**data, "digest": f"sha256:{data['sha256']}"}
            del data["sha256"]
        return data


class InputRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    manifest_sha256: str | None = None


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    count: int = Field(ge=1)


class Manifest(BaseModel):
    """What docs/architecture.md's 'Artifacts' section lists, plus the shard (for shard manifests)."""

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
    size or digest differs.
    """
    key = manifest_key(prefix)
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
    """Check that every listed file exists with the recorded size and digest (streamed)."""
    base = prefix.strip("/")
    listing = {o.key: o.size for o in store.list(base)}
    for f in m.files:
        key = f"{base}/{f.path}" if base else f.path
        if key not in listing:
            raise ManifestError(f"{store.url(key)}: listed in the manifest but missing")
        if listing[key] != f.bytes:
            raise ManifestError(f"{store.url(key)}: {listing[key]} bytes, manifest says {f.bytes}")
        got, _ = store.hash_object(key, algorithm_of(f.digest))
        if got != f.digest:
            raise ManifestError(f"{store.url(key)}: digest {got} does not match the manifest's {f.digest}")


def has_manifest(store: Store, prefix: str = "") -> bool:
    return store.exists(manifest_key(prefix))


def describe_dir(local: str | Path) -> list[FileEntry]:
    """FileEntry for every file under ``local`` (hashes streamed), sorted by path."""
    local = Path(local)
    return [
        FileEntry(path=p.relative_to(local).as_posix(), bytes=p.stat().st_size, digest=file_digest(p))
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
    store.write_bytes(manifest_key(prefix), manifest_bytes(m))
    return m


def fetch(store: Store, prefix: str, dest: str | Path, m: Manifest | None = None) -> Path:
    """Materialise an artifact into ``dest`` from the digest-keyed cache, verifying every file.

    Files are hard-linked (or copied) from the cache; the manifest is copied beside them.
    """
    if m is None:
        m, _ = read_manifest(store, prefix)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = prefix.strip("/")
    for f in m.files:
        blob = store.fetch(f"{base}/{f.path}" if base else f.path, f.digest, f.bytes)
        out = dest / f.path
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and (os.path.samefile(out, blob)  # a link to the verified blob: not re-read
                             or out.stat().st_size == f.bytes and file_digest(out, algorithm_of(f.digest)) == f.digest):
            continue
        out.unlink(missing_ok=True)
        try:
            os.link(blob, out)
        except OSError:
            import shutil

            shutil.copyfile(blob, out)
    (dest / MANIFEST).write_bytes(manifest_bytes(m))
    return dest


def read_verified(store: Store, prefix: str, path: str, m: Manifest | None = None) -> bytes:
    """The bytes of the artifact file ``path`` under ``prefix``, hashed as they are read and
    checked against its manifest entry (:meth:`Store.stream_verified`: digest and size); a file
    the manifest does not list, or bytes that differ from it, raise a one-line error naming the
    file."""
    if m is None:
        m, _ = read_manifest(store, prefix)
    entry = next((f for f in m.files if f.path == path), None)
    key = f"{prefix.strip('/')}/{path}" if prefix.strip("/") else path
    if entry is None:
        raise ManifestError(f"{store.url(key)}: not listed in {store.url(manifest_key(prefix))}")
    with store.stream_verified(key, entry.digest, entry.bytes) as f:
        return f.read()


def read_verified_json(store: Store, prefix: str, path: str, m: Manifest | None = None) -> Any:
    """:func:`read_verified`, parsed as JSON (a one-line error naming the file when it is not)."""
    try:
        return json.loads(read_verified(store, prefix, path, m))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{store.url(prefix)}/{path}: not valid JSON ({e})") from None


def merge_metrics(shard_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum numeric metrics across shards; others are kept per shard."""
    out: dict[str, Any] = {}
    for m in shard_metrics:
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def finalize_shards(store: Store, stage_prefix: str, count: int,
                    check: Callable[[Manifest], None] | None = None) -> Manifest | None:
    """Write the stage manifest if all ``count`` shard manifests exist; else return None.

    Idempotent and race-safe: the stage manifest is a pure function of the shard manifests
    (``created_at`` is the latest shard's), so concurrent finishers write identical bytes.
    ``check`` sees the stage manifest before it is written and may raise to refuse it. A
    ``rows`` metric is summed only when every shard records one.
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
    files = [FileEntry(path=f"{sp[rel:]}/{f.path}", bytes=f.bytes, digest=f.digest)
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
    if any("rows" not in m.metrics for _, m, _ in shards):
        stage.metrics.pop("rows", None)
    if check is not None:
        check(stage)
    store.write_bytes(manifest_key(stage_prefix), manifest_bytes(stage))
    return stage


__all__ = [
    "FileEntry", "InputRef", "Manifest", "ManifestError", "ShardInfo", "describe_dir", "fetch", "finalize_shards",
    "has_manifest", "manifest_bytes", "merge_metrics", "now", "publish", "read_manifest", "read_verified",
    "read_verified_json", "verify_files",
]

"""Artifact store: ``file://`` and ``s3://`` behind one small interface.

- Keys are ``/``-separated paths relative to the store root (the URI given to :func:`open_store`).
- Writes are atomic per object: local files go through a temp file and ``os.replace``; S3
  objects appear only when their (multipart) upload completes.
- S3 (:mod:`lopd.store.s3`) goes through boto3's transfer manager (multipart, parallel parts)
  with botocore's retry modes. Endpoint and credentials come from the standard AWS environment
  only (``AWS_ENDPOINT_URL``, the credential chain, IRSA); nothing here reads them from a recipe.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- Content is named by a digest, ``blake3:<hex>`` (``sha256:<hex>`` from older manifests is
  still verified): :mod:`lopd.store.common`.
- :meth:`Store.open_verified` hands a reader bytes verified against a manifest's digest and
  size, its stat signature checked again on close. S3 objects are streamed once into a local
  cache keyed by digest (parallel ranged GETs, the copy hashed in order while later ranges
  land: :meth:`Store.fetch`); a file store's files are verified and read in place.
  :meth:`Store.stream_verified` is the sequential form: bytes hashed as they are read and
  refused at the end of the stream when they differ (no copy, no pass before). What was
  verified is registered under its stat signature (size, mtime_ns, ctime_ns, inode, device)
  and trusted without rereading until that signature moves; a file the publisher hashed and
  uploaded to a file store on this machine is registered from the start.

Modules: :mod:`lopd.store.common` (errors, keys, hashing), :mod:`lopd.store.verified` (the
signature registry, the cache, checked readers), :mod:`lopd.store.base` (:class:`Store`),
:mod:`lopd.store.local` (:class:`FileStore`), :mod:`lopd.store.s3` (``S3Store``, imported only
for ``s3://`` URIs).
This package knows nothing of torch or of manifests (see :mod:`lopd.manifest`).
"""

from __future__ import annotations

from pathlib import Path

from lopd.store.base import Store
from lopd.store.common import (
    ALGORITHM,
    CHUNK,
    DIGEST_PATTERN,
    IntegrityError,
    NotFound,
    ObjectInfo,
    StoreError,
    algorithm_of,
    cache_dir,
    clean_key,
    copy_hashing,
    digest_bytes,
    digest_stream,
    stat_signature,
)
from lopd.store.local import FileStore
from lopd.store.verified import file_digest


def open_store(uri: str | Path) -> Store:
    """A store for ``s3://bucket/prefix``, ``file:///path`` or a bare path."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from lopd.store.s3 import S3Store

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"bad store URI {uri!r}: no bucket")
        return S3Store(bucket, prefix)
    if uri.startswith("file://"):
        return FileStore(uri[len("file://") :])
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r} (use s3:// or file://)")
    return FileStore(uri)


def is_store_uri(ref: str) -> bool:
    return ref.startswith(("s3://", "file://"))


__all__ = [
    "ALGORITHM", "CHUNK", "DIGEST_PATTERN", "FileStore", "IntegrityError", "NotFound", "ObjectInfo", "Store",
    "StoreError", "algorithm_of", "cache_dir", "clean_key", "copy_hashing", "digest_bytes", "digest_stream",
    "file_digest", "is_store_uri", "open_store", "stat_signature",
]

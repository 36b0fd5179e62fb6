"""Artifact store: ``file://`` and ``s3://`` behind one small interface.

- Keys are ``/``-separated paths relative to the store root (the URI given to :func:`open_store`).
- Writes are atomic per object: local files go through a temp file and ``os.replace``; S3
  objects appear only when their (multipart) upload completes.
- S3 (:mod:`lopd.store.s3`) goes through boto3's transfer manager (multipart, parallel parts)
  with botocore's retry modes. Endpoint and credentials come from the standard AWS environment
  only (``AWS_ENDPOINT_URL``, the credential chain, IRSA); nothing here reads them from a recipe.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- :meth:`Store.fetch` streams an object once into a local cache keyed by sha256 (a kernel copy
  for a file store, parallel ranged GETs for S3), hashing the copy in order while later ranges
  land, and :meth:`Store.open_verified` hands readers that verified copy; a cache hit rests on
  content, not on the name, and an unchanged one (same stat signature) is not re-read.

Modules: :mod:`lopd.store.base` (errors, hashing, :class:`Store`), :mod:`lopd.store.local`
(:class:`FileStore`), :mod:`lopd.store.s3` (``S3Store``, imported only for ``s3://`` URIs).
This package knows nothing of torch or of manifests (see :mod:`lopd.manifest`).
"""

from __future__ import annotations

from pathlib import Path

from lopd.store.base import (
    CHUNK,
    IntegrityError,
    NotFound,
    ObjectInfo,
    Store,
    StoreError,
    cache_dir,
    clean_key,
    copy_hashing,
    sha256_file,
    sha256_stream,
    stat_signature,
)
from lopd.store.local import FileStore


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
    "CHUNK", "FileStore", "IntegrityError", "NotFound", "ObjectInfo", "Store", "StoreError", "cache_dir",
    "clean_key", "copy_hashing", "is_store_uri", "open_store", "sha256_file", "sha256_stream", "stat_signature",
]

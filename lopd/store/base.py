"""The store's interface: :class:`Store`, with what every backend derives from its primitives.

- Keys are ``/``-separated paths relative to the store root (the URI given to
  :func:`lopd.store.open_store`); :func:`clean_key` rejects ``.`` and ``..`` parts.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- :meth:`Store.fetch` streams an object once into a local cache keyed by its digest, hashing
  it on the way (overlapped with the transfer: :func:`~lopd.store.verified.fill_hashing`);
  :meth:`Store.open_verified` hands readers that verified copy, checked again on close. A
  cache hit rests on content (see :mod:`lopd.store.verified`).
- :meth:`Store.stream_verified` is the sequential verified read: the object's own stream,
  hashed as it is read, refused at its end when it differs (no copy, no extra pass).

Errors, keys and hashing live in :mod:`lopd.store.common`, the signature registry and the cache
in :mod:`lopd.store.verified`; their names are re-exported here for older imports. The
backends (:mod:`lopd.store.local`, :mod:`lopd.store.s3`) build on these three modules only.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any

from lopd.store.common import (
    ALGORITHM,
    CHUNK,
    IntegrityError,
    NotFound,
    ObjectInfo,
    StoreError,
    algorithm_of,
    cache_dir,
    check_digest,
    clean_key,
    copy_hashing,
    digest_stream,
    pwrite_all,
    signature_of,
    stat_signature,
)
from lopd.store.verified import (
    StreamVerified,
    blob_path,
    cache_hit,
    file_digest,
    fill_hashing,
    open_blob,
    record_verified,
)

__all__ = [
    "CHUNK", "IntegrityError", "NotFound", "ObjectInfo", "Store", "StoreError", "cache_dir", "clean_key",
    "copy_hashing", "digest_stream", "file_digest", "fill_hashing", "pwrite_all", "stat_signature",
]


class Store:
    """Common interface; use :func:`lopd.store.open_store` to get one."""

    uri: str

    # -- primitives each backend implements
    def put_file(self, local: str | Path, key: str) -> None:
        raise NotImplementedError

    def get_file(self, key: str, local: str | Path) -> None:
        raise NotImplementedError

    def open(self, key: str) -> IO[bytes]:
        """A binary stream of the object (read sequentially; close it)."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under ``prefix`` (recursive), sorted by key; keys relative to the root."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (or the object ``prefix``)."""
        raise NotImplementedError

    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` under this one (the store :meth:`url` of ``prefix`` names)."""
        raise NotImplementedError

    # -- derived
    def url(self, key: str = "") -> str:
        key = clean_key(key)
        return self.uri.rstrip("/") + ("/" + key if key else "")

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.url(key)}: not valid JSON ({e})") from None

    def write_json(self, key: str, obj: Any) -> bytes:
        """Write ``obj`` as canonical, indented JSON; returns the bytes written."""
        data = (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        self.write_bytes(key, data)
        return data

    def put_dir(self, local: str | Path, prefix: str = "") -> list[str]:
        """Upload every file under ``local`` to ``prefix/<relative path>``; returns the keys."""
        local = Path(local)
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            key = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
            self.put_file(path, key)
            keys.append(key)
        return keys

    def get_dir(self, prefix: str, local: str | Path) -> list[Path]:
        """Download every object under ``prefix`` into ``local`` (relative layout kept)."""
        prefix = clean_key(prefix)
        out = []
        for obj in self.list(prefix):
            rel = obj.key[len(prefix) :].lstrip("/") if prefix else obj.key
            dest = Path(local) / rel
            self.get_file(obj.key, dest)
            out.append(dest)
        return out

    def check_within(self, key: str) -> None:
        """Raise :class:`StoreError` when ``key`` lies outside this store (a no-op where keys cannot)."""

    def _stream_into(self, key: str, dest: Path, algorithm: str) -> tuple[str, int]:
        """Stream ``key`` into the local file ``dest`` in one pass; returns its digest and size
        (a backend may retry the whole pass)."""
        with self.open(key) as src, open(dest, "wb") as out:
            return copy_hashing(src, out, algorithm)

    def _copy_verified(self, key: str, dest: Path, digest: str, size: int | None) -> None:
        """Copy ``key`` into ``dest``, hashing as it streams, then check the digest and size."""
        got, n = self._stream_into(key, dest, algorithm_of(digest))
        check_digest(self.url(key), got, n, digest, size)

    def fetch(self, key: str, digest: str, size: int | None = None) -> Path:
        """A verified local copy of ``key`` in the digest-keyed cache; returns its path.

        A miss streams the object once into the cache, hashed as it lands (no second read), and
        raises :class:`IntegrityError` naming the file and both digests (or sizes) on a mismatch;
        nothing is left in the cache then. A hit rests on content, not on the name: a verified
        blob's :func:`stat_signature` is registered (:mod:`lopd.store.verified`), and a hit whose
        signature differs (written, touched, replaced or hard-linked since) is re-hashed; a blob
        that no longer matches is dropped and downloaded again. An unchanged hit is not re-read.
        """
        return self._fetch(key, digest, size)[0]

    def _fetch(self, key: str, digest: str, size: int | None) -> tuple[Path, list[int]]:
        """:meth:`fetch`, with the signature the blob was verified under."""
        dest = blob_path(digest)
        if (sig := cache_hit(dest, digest, size)) is not None:
            return dest, sig
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            self._copy_verified(key, tmp, digest, size)
            ours = _install(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if not ours:  # another process verified and installed the object meanwhile
            if (sig := cache_hit(dest, digest, size)) is not None:
                return dest, sig
            return self._fetch(key, digest, size)
        st = os.stat(dest)
        record_verified(st, digest)
        return dest, signature_of(st)

    def open_verified(self, key: str, digest: str, size: int | None = None) -> IO[bytes]:
        """A seekable local binary file holding ``key``'s bytes, verified against ``digest`` and
        ``size`` before it is returned (the cached copy of :meth:`fetch`, for the base
        implementation); its stat signature is checked again on close, and a change raises
        :class:`IntegrityError` then (:class:`~lopd.store.verified.VerifiedFile`). Close it.
        For readers that need random access (parquet); a sequential reader takes
        :meth:`stream_verified`."""
        return open_blob(*self._fetch(key, digest, size))

    def stream_verified(self, key: str, digest: str, size: int | None = None) -> IO[bytes]:
        """``key``'s bytes as a sequential stream, hashed as they are read; the read that reaches
        the end (or ``close`` before it) raises :class:`IntegrityError` when they differ from
        ``digest`` or ``size`` (:class:`~lopd.store.verified.StreamVerified`). Whoever reads it
        must publish nothing before the stream has ended: a stage reads its inputs before it
        publishes. Close it."""
        return StreamVerified(self.open(key), digest, size, self.url(key))

    def hash_object(self, key: str, algorithm: str | None = None) -> tuple[str, int]:
        """Digest and size of a stored object, streamed."""
        with self.open(key) as f:
            return digest_stream(f, algorithm or ALGORITHM)



def _install(tmp: Path, dest: Path) -> bool:
    """Put the verified ``tmp`` at ``dest`` unless another process already put a copy there (a
    blob is never replaced under its readers: the unlink would move the signature their
    :class:`~lopd.store.verified.VerifiedFile` checks on close). True when ``tmp`` went in."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        os.replace(tmp, dest)
    return True

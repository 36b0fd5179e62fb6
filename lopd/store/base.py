"""The store's interface: :class:`Store`, with what every backend derives from its primitives.

- Keys are ``/``-separated paths relative to the store root (the URI given to
  :func:`lopd.store.open_store`); :func:`clean_key` rejects ``.`` and ``..`` parts.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- :meth:`Store.fetch` streams an object once into a local cache keyed by sha256, hashing it on
  the way (overlapped with the transfer: :func:`~lopd.store.verified.fill_hashing`);
  :meth:`Store.open_verified` hands readers that verified copy, checked again on close. A
  cache hit rests on content (see :mod:`lopd.store.verified`).

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
    CHUNK,
    IntegrityError,
    NotFound,
    ObjectInfo,
    StoreError,
    cache_dir,
    clean_key,
    copy_hashing,
    pwrite_all,
    sha256_stream,
    signature_of,
    stat_signature,
)
from lopd.store.verified import (
    blob_path,
    cache_hit,
    fill_hashing,
    open_blob,
    record_verified,
    sha256_file,
)

__all__ = [
    "CHUNK", "IntegrityError", "NotFound", "ObjectInfo", "Store", "StoreError", "cache_dir", "clean_key",
    "copy_hashing", "fill_hashing", "pwrite_all", "sha256_file", "sha256_stream", "stat_signature",
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

    def _stream_into(self, key: str, dest: Path) -> tuple[str, int]:
        """Stream ``key`` into the local file ``dest`` in one pass; returns its sha256 and size
        (a backend may retry the whole pass)."""
        with self.open(key) as src, open(dest, "wb") as out:
            return copy_hashing(src, out)

    def _copy_verified(self, key: str, dest: Path, sha256: str, size: int | None) -> None:
        """Copy ``key`` into ``dest``, hashing as it streams, then check the hash and size."""
        got, n = self._stream_into(key, dest)
        if size is not None and n != size:
            raise IntegrityError(f"{self.url(key)}: {n} bytes, the manifest says {size} "
                                 f"(sha256 {got}, the manifest's {sha256})")
        if got != sha256:
            raise IntegrityError(f"{self.url(key)}: sha256 {got} does not match the manifest's {sha256}")

    def fetch(self, key: str, sha256: str, size: int | None = None) -> Path:
        """A verified local copy of ``key`` in the sha256-keyed cache; returns its path.

        A miss streams the object once into the cache, hashed as it lands (no second read), and
        raises :class:`IntegrityError` naming the file and both hashes (or sizes) on a mismatch;
        nothing is left in the cache then. A hit rests on content, not on the name: a verified
        blob's :func:`stat_signature` is registered (:mod:`lopd.store.verified`), and a hit whose
        signature differs (written, touched, replaced or hard-linked since) is re-hashed; a blob
        that no longer matches is dropped and downloaded again. An unchanged hit is not re-read.
        """
        return self._fetch(key, sha256, size)[0]

    def _fetch(self, key: str, sha256: str, size: int | None) -> tuple[Path, list[int]]:
        """:meth:`fetch`, with the signature the blob was verified under."""
        dest = blob_path(sha256)
        if (sig := cache_hit(dest, sha256, size)) is not None:
            return dest, sig
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            self._copy_verified(key, tmp, sha256, size)
            ours = _install(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        if not ours:  # another process verified and installed the object meanwhile
            if (sig := cache_hit(dest, sha256, size)) is not None:
                return dest, sig
            return self._fetch(key, sha256, size)
        st = os.stat(dest)
        record_verified(st, sha256)
        return dest, signature_of(st)

    def open_verified(self, key: str, sha256: str, size: int | None = None) -> IO[bytes]:
        """A seekable local binary file holding ``key``'s bytes, verified against ``sha256`` and
        ``size`` before it is returned (the cached copy of :meth:`fetch`, for the base
        implementation); its stat signature is checked again on close, and a change raises
        :class:`IntegrityError` then (:class:`~lopd.store.verified.VerifiedFile`). Close it."""
        return open_blob(*self._fetch(key, sha256, size))

    def hash_object(self, key: str) -> tuple[str, int]:
        """sha256 and size of a stored object, streamed."""
        with self.open(key) as f:
            return sha256_stream(f)


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

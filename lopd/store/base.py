"""The store's common ground: errors, object info, streamed hashing, the cache and :class:`Store`.

- Keys are ``/``-separated paths relative to the store root (the URI given to
  :func:`lopd.store.open_store`); :func:`clean_key` rejects ``.`` and ``..`` parts.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- :meth:`Store.fetch` streams an object once into a local cache keyed by sha256, hashing it on
  the way (overlapped with the transfer: :func:`fill_hashing`); :meth:`Store.open_verified` hands
  readers that verified copy. A cache hit rests on content (see :meth:`Store.fetch`).

The backends (:mod:`lopd.store.local`, :mod:`lopd.store.s3`) build on this module only.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lopd import LopdError

CHUNK = 1 << 20


class StoreError(LopdError):
    """A store operation failed; the message names the URI."""


class NotFound(StoreError):
    """The key does not exist."""


class IntegrityError(StoreError):
    """Content does not match its recorded sha256 or size."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """sha256 and byte count of a readable stream."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[str, int]:
    """Copy ``src`` to ``dst``; returns the sha256 and byte count of what passed, each chunk hashed
    on a second thread (hashlib releases the GIL) while the next is read and written."""
    h, n, pending = hashlib.sha256(), 0, None
    with ThreadPoolExecutor(1, thread_name_prefix="lopd-sha256") as hasher:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            n += len(chunk)
            if pending is not None:
                pending.result()
            pending = hasher.submit(h.update, chunk)
        if pending is not None:
            pending.result()
    return h.hexdigest(), n


def fill_hashing(dest: Path, size: int, fill: Callable[[int, int, int], None], part: int,
                 workers: int) -> tuple[str, int]:
    """Write ``dest`` (``size`` bytes) in ``part``-sized ranges, each by ``fill(fd, start, end)`` on
    one of ``workers`` threads, while this thread hashes the file in order as each range lands
    (read back from the page cache: the hash covers ``dest`` itself). Returns its sha256 and size."""
    h, buf = hashlib.sha256(), memoryview(bytearray(CHUNK))
    ranges = [(start, min(size, start + part)) for start in range(0, size, part)]
    with open(dest, "wb+") as out, ThreadPoolExecutor(workers, thread_name_prefix="lopd-fill") as pool:
        fd = out.fileno()
        futures = [pool.submit(fill, fd, start, end) for start, end in ranges]
        try:
            for future, (pos, end) in zip(futures, ranges, strict=True):
                future.result()
                while pos < end:
                    n = os.preadv(fd, [buf[: min(CHUNK, end - pos)]], pos)
                    if n <= 0:
                        raise StoreError(f"{dest}: bytes from {pos} missing after they were written")
                    h.update(buf[:n])
                    pos += n
        finally:
            for future in futures:
                future.cancel()
        return h.hexdigest(), os.fstat(fd).st_size


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def stat_signature(p: Path) -> list[int]:
    """What a recorded hash of ``p`` is trusted under: ``[size, mtime_ns, ctime_ns, inode, device]``.

    A write in place changes ``ctime_ns`` (which no tool can set back) even when the size and a
    restored ``mtime_ns`` stay the same; a replacement file has a new inode. Any difference
    means the file is hashed again (the download cache here, model fingerprints in
    :mod:`lopd.fingerprint`).
    """
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _signature(path: Path) -> str:
    return " ".join(map(str, stat_signature(path)))


def _sig_path(blob: Path) -> Path:
    return blob.with_name(f".{blob.name}.verified")


def _record_signature(blob: Path) -> None:
    """Record ``blob``'s stat signature as verified (atomically)."""
    sig = _sig_path(blob)
    tmp = sig.with_name(f"{sig.name}.{uuid.uuid4().hex}.part")
    tmp.write_text(_signature(blob))
    os.replace(tmp, sig)


def _cache_hit(blob: Path, sha256: str, size: int | None) -> bool:
    """Whether the cached ``blob`` holds ``sha256``'s bytes (re-hashed when its signature moved);
    a blob that does not is removed."""
    try:
        if size is not None and blob.stat().st_size != size:
            blob.unlink(missing_ok=True)
            return False
        current = _signature(blob)
    except FileNotFoundError:
        return False
    try:
        if _sig_path(blob).read_text() == current:
            return True
    except FileNotFoundError:
        pass
    if sha256_file(blob) == sha256:
        _record_signature(blob)
        return True
    blob.unlink(missing_ok=True)
    _sig_path(blob).unlink(missing_ok=True)
    return False


def cache_dir() -> Path:
    """Local download cache (``LOPD_CACHE``, default ``~/.cache/lopd``)."""
    return Path(os.environ.get("LOPD_CACHE", Path.home() / ".cache" / "lopd"))


def clean_key(key: str) -> str:
    """``key`` without leading/trailing ``/``; raises :class:`StoreError` on ``.`` or ``..`` parts."""
    key = key.strip("/")
    if any(part in ("..", ".") for part in key.split("/")):
        raise StoreError(f"invalid store key {key!r}")
    return key


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
        blob's :func:`stat_signature` is recorded beside it, and a hit whose signature differs
        (written, touched, replaced or hard-linked since) is re-hashed; a blob that no longer
        matches is dropped and downloaded again. An unchanged hit is not re-read.
        """
        dest = cache_dir() / "blobs" / sha256[:2] / sha256
        if _cache_hit(dest, sha256, size):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            self._copy_verified(key, tmp, sha256, size)
            os.replace(tmp, dest)
            _record_signature(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def open_verified(self, key: str, sha256: str, size: int | None = None) -> IO[bytes]:
        """A seekable local binary file holding ``key``'s bytes, verified against ``sha256`` and
        ``size`` before it is returned (via :meth:`fetch`); close it."""
        return open(self.fetch(key, sha256, size), "rb")

    def hash_object(self, key: str) -> tuple[str, int]:
        """sha256 and size of a stored object, streamed."""
        with self.open(key) as f:
            return sha256_stream(f)

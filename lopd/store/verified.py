"""Read verification: the verified-signature registry, the digest-keyed cache and checked readers.

- The **registry** (``$LOPD_CACHE/verified/<device>-<inode>``) records, for a local file whose
  digest was computed (or whose bytes were copied from such a file unchanged), that digest
  together with the file's :func:`~lopd.store.common.stat_signature` (size, mtime_ns,
  ctime_ns, inode, device). :func:`registered_digest` trusts an entry only while the file's
  current signature is exactly the recorded one: any write, touch, rename, replacement or
  new hard link moves ``ctime_ns`` or the inode, and the file is hashed again.
  :func:`file_digest` records every hash it takes of a file that did not change while it was
  read, so a file hashed by its publisher (a stage's part, a manifest's listed file) is known.
- The **cache** holds verified copies under ``$LOPD_CACHE/blobs/<algorithm>/<hex[:2]>/<hex>``
  (:func:`cache_hit`); a blob is a registry entry like any other file.
- :class:`VerifiedFile` is what a seekable verified read hands out: a local file whose
  signature is checked again on close, so bytes changed under a reader are refused
  (:class:`IntegrityError`) even when the reader already holds them.
- :class:`StreamVerified` is the sequential verified read: the bytes are hashed on a second
  thread as the reader takes them, and the end of the stream (or ``close``) raises
  :class:`IntegrityError` when they differ from the manifest's, so nothing that used them
  publishes. No copy and no pass before the read.
- :func:`fill_hashing` writes a copy in ranges on worker threads while hashing it in order.
"""

from __future__ import annotations

import io
import os
import stat
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from lopd.store.common import (
    ALGORITHM,
    CHUNK,
    IntegrityError,
    StoreError,
    advise_sequential,
    algorithm_of,
    cache_dir,
    check_digest,
    digest_fd,
    digest_stream,
    finish,
    new_hasher,
    signature_of,
)


def _entry(st: os.stat_result) -> Path:
    return cache_dir() / "verified" / f"{st.st_dev}-{st.st_ino}"


def record_verified(st: os.stat_result, digest: str) -> None:
    """Record that the file ``st`` describes (its current signature) holds ``digest``'s bytes.

    Call it only with a signature taken after the bytes were hashed (or copied from a file
    whose registered signature did not move meanwhile). Atomic; a read-only cache only costs
    hashing again later.
    """
    entry = _entry(st)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.part")
        tmp.write_text(" ".join([digest, *map(str, signature_of(st))]))
        os.replace(tmp, entry)
    except OSError:
        pass


def registered_digest(st: os.stat_result) -> str | None:
    """The digest registered for the file ``st`` describes, if its signature is exactly the one
    recorded with it; else None."""
    try:
        digest, *sig = _entry(st).read_text().split()
    except (OSError, ValueError):
        return None
    return digest if sig == [str(x) for x in signature_of(st)] else None


def file_digest(path: str | Path, algorithm: str | None = None) -> str:
    """Digest (``<algorithm>:<hex>``, BLAKE3 unless ``algorithm`` says otherwise) of a local
    file, streamed in 1 MiB chunks; a regular file that did not change while it was read is
    recorded in the registry under its signature."""
    algorithm = algorithm or ALGORITHM
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if not stat.S_ISREG(before.st_mode):
            return digest_stream(f, algorithm)[0]
        digest, _ = digest_fd(f.fileno(), algorithm)
        after = os.fstat(f.fileno())
    if signature_of(after) == signature_of(before):
        record_verified(after, digest)
    return digest


def blob_path(digest: str) -> Path:
    algorithm, hexpart = algorithm_of(digest), digest.partition(":")[2]
    return cache_dir() / "blobs" / algorithm / hexpart[:2] / hexpart


def cache_hit(blob: Path, digest: str, size: int | None) -> list[int] | None:
    """The signature under which the cached ``blob`` is known to hold ``digest``'s bytes: trusted
    without reading when its signature is registered with ``digest``, else re-hashed (and then
    trusted only if it did not change meanwhile). None on a miss; a blob that does not match
    is removed."""
    try:
        st = os.stat(blob)
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        blob.unlink(missing_ok=True)
        return None
    if registered_digest(st) == digest:
        return signature_of(st)
    if file_digest(blob, algorithm_of(digest)) != digest:
        blob.unlink(missing_ok=True)
        return None
    try:
        after = signature_of(os.stat(blob))
    except FileNotFoundError:
        return None
    return after if after == signature_of(st) else None


class VerifiedFile(io.FileIO):
    """A local file verified against a manifest entry, opened for reading. Its stat signature at
    verification is checked again on :meth:`close`: a change (the file written, touched or
    replaced in place while it was read) raises :class:`IntegrityError`, so what was read is
    refused. Use it in a ``with`` block."""

    def __init__(self, fd: int, signature: list[int], what: str):
        super().__init__(fd, "rb", closefd=True)
        self._signature, self._what = signature, what

    def close(self) -> None:
        if self.closed:
            return
        try:
            moved = signature_of(os.fstat(self.fileno())) != self._signature
        finally:
            super().close()
        if moved:
            raise IntegrityError(f"{self._what}: changed while it was being read (its stat signature moved "
                                 "after it was verified); refusing what was read")


def open_checked(fd: int, signature: list[int], what: str) -> io.BufferedReader:
    """A buffered :class:`VerifiedFile` over ``fd`` (positioned at 0), checked on close; the
    kernel is advised that it is read mostly in order (parquet reads its column chunks so)."""
    os.lseek(fd, 0, os.SEEK_SET)
    advise_sequential(fd)
    return io.BufferedReader(VerifiedFile(fd, signature, what))


def open_blob(blob: Path, signature: list[int]) -> io.BufferedReader:
    """Open a cached blob :func:`cache_hit` accepted under ``signature``, checked again now and on
    close (a blob changed in between is refused)."""
    fd = os.open(blob, os.O_RDONLY)
    try:
        if signature_of(os.fstat(fd)) != signature:
            raise IntegrityError(f"{blob}: the cached copy changed after it was verified; refusing it")
        return open_checked(fd, signature, str(blob))
    except BaseException:
        os.close(fd)
        raise


class StreamVerified(io.RawIOBase):
    """A sequential reader of ``src`` verified against ``digest`` and ``size`` as it is read: each
    chunk is handed out as the very ``bytes`` object ``src`` returned (immutable, so no copy)
    and hashed on a second thread while the reader works on it and the next chunk is read. The
    read that reaches the end raises :class:`IntegrityError` (naming ``what`` and both digests
    or sizes) instead of returning ``b""`` when the bytes differ, and so does :meth:`close`
    before the end: it reads and hashes the rest first, so a reader that stopped early still
    learns whether what it took was intact. Not seekable. Use it in a ``with`` block."""

    def __init__(self, src: IO[bytes], digest: str, size: int | None, what: str):
        super().__init__()
        self._src, self._want, self._size, self._what = src, digest, size, what
        self._algorithm = algorithm_of(digest)
        self._hasher, self._n, self._pending, self._done = new_hasher(self._algorithm), 0, None, False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lopd-verify")

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        chunk = self._src.read(n) if n else b""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        if not chunk:
            if n:
                self._check()
            return b""
        if self._size is not None and self._n + len(chunk) > self._size:
            self._fail(f"more than the manifest's {self._size} bytes")
        self._n += len(chunk)
        self._pending = self._pool.submit(self._hasher.update, chunk)
        return chunk

    def readall(self) -> bytes:
        parts = []
        while chunk := self.read(CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, b) -> int:
        chunk = self.read(len(memoryview(b)))
        memoryview(b).cast("B")[: len(chunk)] = chunk
        return len(chunk)

    def _fail(self, why: str) -> None:
        self._done = True
        raise IntegrityError(f"{self._what}: {why}; refusing what was read")

    def _check(self) -> None:
        if self._done:
            return
        self._done = True
        check_digest(self._what, finish(self._hasher, self._algorithm), self._n, self._want, self._size,
                     "; refusing what was read")

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done:
                while self.read(CHUNK):
                    pass
        finally:
            if self._pending is not None:
                self._pending.cancel()
            self._pool.shutdown()
            self._src.close()
            super().close()


def fill_hashing(dest: Path, size: int, fill: Callable[[int, int, int], None], part: int,
                 workers: int, algorithm: str = ALGORITHM) -> tuple[str, int]:
    """Write ``dest`` (``size`` bytes) in ``part``-sized ranges, each by ``fill(fd, start, end)`` on
    one of ``workers`` threads, while this thread hashes the file in order as each range lands
    (read back from the page cache: the hash covers ``dest`` itself). Returns its digest and size."""
    h, buf = new_hasher(algorithm), memoryview(bytearray(CHUNK))
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
        return finish(h, algorithm), os.fstat(fd).st_size

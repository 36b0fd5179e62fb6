"""Read verification: the verified-signature registry, the sha256-keyed cache and checked readers.

- The **registry** (``$LOPD_CACHE/verified/<device>-<inode>``) records, for a local file whose
  sha256 was computed (or whose bytes were copied from such a file unchanged), that sha256
  together with the file's :func:`~lopd.store.common.stat_signature` (size, mtime_ns,
  ctime_ns, inode, device). :func:`registered_sha256` trusts an entry only while the file's
  current signature is exactly the recorded one: any write, touch, rename, replacement or
  new hard link moves ``ctime_ns`` or the inode, and the file is hashed again.
  :func:`sha256_file` records every hash it takes of a file that did not change while it was
  read, so a file hashed by its publisher (a stage's part, a manifest's listed file) is known.
- The **cache** holds verified copies under ``$LOPD_CACHE/blobs/<sha[:2]>/<sha>``
  (:func:`cache_hit`); a blob is a registry entry like any other file.
- :class:`VerifiedFile` is what a verified read hands out: a local file whose signature is
  checked again on close, so bytes changed under a reader are refused (:class:`IntegrityError`)
  even when the reader already holds them.
- :func:`fill_hashing` writes a copy in ranges on worker threads while hashing it in order.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lopd.store.common import (
    CHUNK,
    IntegrityError,
    StoreError,
    cache_dir,
    sha256_fd,
    sha256_stream,
    signature_of,
)


def _entry(st: os.stat_result) -> Path:
    return cache_dir() / "verified" / f"{st.st_dev}-{st.st_ino}"


def record_verified(st: os.stat_result, sha256: str) -> None:
    """Record that the file ``st`` describes (its current signature) holds ``sha256``'s bytes.

    Call it only with a signature taken after the bytes were hashed (or copied from a file
    whose registered signature did not move meanwhile). Atomic; a read-only cache only costs
    hashing again later.
    """
    entry = _entry(st)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.part")
        tmp.write_text(" ".join([sha256, *map(str, signature_of(st))]))
        os.replace(tmp, entry)
    except OSError:
        pass


def registered_sha256(st: os.stat_result) -> str | None:
    """The sha256 registered for the file ``st`` describes, if its signature is exactly the one
    recorded with it; else None."""
    try:
        sha, *sig = _entry(st).read_text().split()
    except (OSError, ValueError):
        return None
    return sha if sig == [str(x) for x in signature_of(st)] else None


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file, streamed in 1 MiB chunks; a regular file that did not change
    while it was read is recorded in the registry under its signature."""
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if not stat.S_ISREG(before.st_mode):
            return sha256_stream(f)[0]
        sha, _ = sha256_fd(f.fileno())
        after = os.fstat(f.fileno())
    if signature_of(after) == signature_of(before):
        record_verified(after, sha)
    return sha


def blob_path(sha256: str) -> Path:
    return cache_dir() / "blobs" / sha256[:2] / sha256


def cache_hit(blob: Path, sha256: str, size: int | None) -> list[int] | None:
    """The signature under which the cached ``blob`` is known to hold ``sha256``'s bytes: trusted
    without reading when its signature is registered with ``sha256``, else re-hashed (and then
    trusted only if it did not change meanwhile). None on a miss; a blob that does not match
    is removed."""
    try:
        st = os.stat(blob)
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        blob.unlink(missing_ok=True)
        return None
    if registered_sha256(st) == sha256:
        return signature_of(st)
    if sha256_file(blob) != sha256:
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
    """A buffered :class:`VerifiedFile` over ``fd`` (positioned at 0), checked on close."""
    os.lseek(fd, 0, os.SEEK_SET)
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

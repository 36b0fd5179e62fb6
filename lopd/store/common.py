"""The store's leaf module: errors, object info, keys, streamed hashing and the stat signature.

It imports nothing else from :mod:`lopd.store`; :mod:`lopd.store.verified` (the signature
registry and the cache) and :mod:`lopd.store.base` (:class:`~lopd.store.base.Store`) build on it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """sha256 and byte count of a readable stream."""
    h, n = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_fd(fd: int) -> tuple[str, int]:
    """sha256 and byte count of the open file ``fd`` from offset 0 (positional reads: the fd's
    offset does not move), streamed in 1 MiB chunks with sequential read-ahead advised."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    h, n, buf = hashlib.sha256(), 0, memoryview(bytearray(CHUNK))
    while got := os.preadv(fd, [buf], n):
        h.update(buf[:got])
        n += got
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


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def signature_of(st: os.stat_result) -> list[int]:
    """:func:`stat_signature` of a stat result (``os.stat`` or ``os.fstat``)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def stat_signature(p: str | Path) -> list[int]:
    """What a recorded hash of ``p`` is trusted under: ``[size, mtime_ns, ctime_ns, inode, device]``.

    A write in place changes ``ctime_ns`` (which no tool can set back) even when the size and a
    restored ``mtime_ns`` stay the same; a replacement file has a new inode; a rename or a new
    hard link moves ``ctime_ns`` too. Any difference means the file is hashed again (the
    verified-signature registry of :mod:`lopd.store.verified`, model fingerprints in
    :mod:`lopd.fingerprint`).
    """
    return signature_of(os.stat(p))


def cache_dir() -> Path:
    """Local download cache (``LOPD_CACHE``, default ``~/.cache/lopd``)."""
    return Path(os.environ.get("LOPD_CACHE", Path.home() / ".cache" / "lopd"))


def clean_key(key: str) -> str:
    """``key`` without leading/trailing ``/``; raises :class:`StoreError` on ``.`` or ``..`` parts."""
    key = key.strip("/")
    if any(part in ("..", ".") for part in key.split("/")):
        raise StoreError(f"invalid store key {key!r}")
    return key

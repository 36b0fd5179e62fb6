"""The filesystem backend of the artifact store: a directory on a local or mounted filesystem.

Writes are atomic per object: each goes through a temp file (``.<name>.*.part``, fsynced) and
``os.replace``, so a reader never sees a partial object. Deletes never follow a symlink out of
the root (:meth:`FileStore.delete`).

Verified reads happen in place (:meth:`FileStore.open_verified`, :meth:`FileStore.stream_verified`):
a store file is hashed once (as it is read, for a sequential reader),
its stat signature registered (:mod:`lopd.store.verified`), and read directly, its signature
checked when opened and again on close. A file uploaded by :meth:`FileStore.put_file` from a
local file whose registered signature did not move during the copy (a file the publisher just
hashed for its manifest) is registered with that digest, so its first verified read here rehashes
nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import IO

from lopd.store.base import Store
from lopd.store.common import (
    CHUNK,
    NotFound,
    ObjectInfo,
    StoreError,
    advise_sequential,
    algorithm_of,
    check_digest,
    clean_key,
    digest_fd,
    pwrite_all,
    signature_of,
)
from lopd.store.verified import (
    StreamVerified,
    fill_hashing,
    open_checked,
    record_verified,
    registered_digest,
)


class FileStore(Store):
    """A directory on a local or mounted filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.uri = "file://" + self.root.as_posix()

    def _path(self, key: str) -> Path:
        key = clean_key(key)
        return self.root / key if key else self.root

    def child(self, prefix: str) -> FileStore:
        return FileStore(self._path(prefix))

    def _atomic_write(self, key: str, writer, published=None) -> None:
        """Write ``key`` through a temp file; ``published(fd)``, when given, runs on the still
        open file once it has replaced the destination."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, dest)
                if published is not None:
                    published(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: str | Path, key: str) -> None:
        """Copy ``local`` to ``key`` atomically. When ``local``'s signature is registered with a
        digest (:func:`lopd.store.file_digest` hashed it) and is still the same after the copy,
        the copy holds exactly those bytes and is registered with that digest too."""
        try:
            src = open(local, "rb")
        except FileNotFoundError:
            raise StoreError(f"upload to {self.url(key)}: local file not found: {local}") from None
        with src:
            before = os.fstat(src.fileno())
            known = registered_digest(before)

            def published(fd: int) -> None:
                if known is not None and signature_of(os.fstat(src.fileno())) == signature_of(before):
                    record_verified(os.fstat(fd), known)

            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, CHUNK), published)

    def get_file(self, key: str, local: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"not found: {self.url(key)}")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def open(self, key: str) -> IO[bytes]:
        """The store file, opened for a sequential read (the kernel is advised so: a larger
        read-ahead window)."""
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None
        advise_sequential(f.fileno())
        return f

    def _stream_into(self, key: str, dest: Path, algorithm: str) -> tuple[str, int]:
        """Copy ``key`` into ``dest``; returns the digest and size of ``dest``. A store file whose
        signature is registered (with a digest of ``algorithm``), and unchanged once the copy is
        done, is copied without hashing
        (``dest`` holds the registered bytes); any other is copied a range ahead of the hashing
        of ``dest`` (:func:`fill_hashing`)."""
        try:
            src = open(self._path(key), "rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None
        with src:
            before = os.fstat(src.fileno())
            size = before.st_size
            known = registered_digest(before)
            if known is not None and algorithm_of(known) == algorithm:
                with open(dest, "wb") as out:
                    _copy_range(src.fileno(), out.fileno(), 0, size)
                if signature_of(os.fstat(src.fileno())) == signature_of(before):
                    return known, size

            def fill(fd: int, start: int, end: int) -> None:
                _copy_range(src.fileno(), fd, start, end)

            return fill_hashing(dest, size, fill, 16 << 20, 1, algorithm)

    def open_verified(self, key: str, digest: str, size: int | None = None) -> IO[bytes]:
        """The store file itself, opened and verified in place: trusted without reading when its
        signature (taken on the open file) is registered with ``digest``, else hashed once and
        registered. A mismatch raises :class:`IntegrityError` naming the file and both digests
        (or sizes); the signature is checked again on close, and a change raises then. A file
        that changes while it is being hashed is read through the cache instead (a private,
        verified copy: :meth:`Store.open_verified`)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None
        try:
            sig = self._verify_in_place(fd, key, digest, size)
        except BaseException:
            os.close(fd)
            raise
        if sig is None:
            os.close(fd)
            return super().open_verified(key, digest, size)
        return open_checked(fd, sig, self.url(key))

    def stream_verified(self, key: str, digest: str, size: int | None = None) -> IO[bytes]:
        """The store file as a sequential stream: read in place and checked on close when its
        signature is registered with ``digest`` (nothing to hash), else hashed as it is read
        (:meth:`Store.stream_verified`)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"not found: {self.url(key)}")
            if _registered(st, digest, size):
                return open_checked(fd, signature_of(st), self.url(key))
            advise_sequential(fd)
            return StreamVerified(open(fd, "rb", buffering=0), digest, size, self.url(key))
        except BaseException:
            os.close(fd)
            raise

    def _verify_in_place(self, fd: int, key: str, digest: str, size: int | None) -> list[int] | None:
        """The signature under which the open store file ``fd`` holds ``digest``'s bytes (None when
        it changed while being hashed); raises :class:`IntegrityError` when it does not hold them."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"not found: {self.url(key)}")
        if _registered(st, digest, size):
            return signature_of(st)
        got, n = digest_fd(fd, algorithm_of(digest))
        check_digest(self.url(key), got, n, digest, size)
        after = os.fstat(fd)
        if signature_of(after) != signature_of(st):
            return None
        record_verified(after, digest)
        return signature_of(after)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            return [ObjectInfo(clean_key(prefix), base.stat().st_size)]
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".part")):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def check_within(self, key: str) -> None:
        """Raise :class:`StoreError` when ``key`` resolves (through a symlink) outside the root."""
        real, root = self._path(key).resolve(), self.root.resolve()
        if real != root and not real.is_relative_to(root):
            raise StoreError(f"{self.url(key)} resolves to {real}, outside the store root {root}; refusing to use it")

    def delete(self, prefix: str) -> None:
        """Delete the object or directory ``prefix``, never through a symlink: a symlink is
        unlinked itself (its target is left alone), links inside a directory are removed, not
        followed, and a ``prefix`` that resolves outside the root through a parent is refused."""
        p = self._path(prefix)
        if p.is_symlink():
            self.check_within(prefix.strip("/").rpartition("/")[0])
            p.unlink()
        elif p.exists():
            self.check_within(prefix)
            if p.is_dir():
                shutil.rmtree(p)  # removes the symlinks it meets without following them
            else:
                p.unlink()


def _registered(st: os.stat_result, digest: str, size: int | None) -> bool:
    """Whether the file ``st`` describes is registered as holding ``digest`` (and ``size`` bytes)."""
    return registered_digest(st) == digest and (size is None or st.st_size == size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes ``[start, end)`` of ``src`` to the same offsets of ``dst`` in 1 MiB writes (the
    page cache then holds the copy in large folios, which later reads walk faster than what
    ``copy_file_range`` leaves); a source that ends early raises :class:`StoreError`."""
    buf = memoryview(bytearray(CHUNK))
    pos = start
    while pos < end:
        n = os.preadv(src, [buf[: min(CHUNK, end - pos)]], pos)
        if n == 0:
            raise StoreError(f"a store file ended at byte {pos} while being copied (expected {end})")
        pwrite_all(dst, buf[:n], pos)
        pos += n


"""The filesystem backend of the artifact store: a directory on a local or mounted filesystem.

Writes are atomic per object: each goes through a temp file (``.<name>.*.part``, fsynced) and
``os.replace``, so a reader never sees a partial object. Deletes never follow a symlink out of
the root (:meth:`FileStore.delete`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO

from lopd.store.base import CHUNK, NotFound, ObjectInfo, Store, StoreError, clean_key, fill_hashing, pwrite_all


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

    def _atomic_write(self, key: str, writer) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: str | Path, key: str) -> None:
        try:
            with open(local, "rb") as src:
                self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, CHUNK))
        except FileNotFoundError:
            raise StoreError(f"upload to {self.url(key)}: local file not found: {local}") from None

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
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None

    def _stream_into(self, key: str, dest: Path) -> tuple[str, int]:
        """Copy ``key`` into ``dest`` a range ahead of the hashing of ``dest`` (:func:`fill_hashing`);
        returns the sha256 and size of ``dest``."""
        try:
            src = open(self._path(key), "rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"not found: {self.url(key)}") from None
        with src:
            def fill(fd: int, start: int, end: int) -> None:
                _copy_range(src.fileno(), fd, start, end)

            return fill_hashing(dest, os.fstat(src.fileno()).st_size, fill, 16 << 20, 1)

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

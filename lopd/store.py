"""Artifact store: ``file://`` and ``s3://`` behind one small interface.

- Keys are ``/``-separated paths relative to the store root (the URI given to :func:`open_store`).
- Writes are atomic per object: local files go through a temp file and ``os.replace``; S3
  objects appear only when their (multipart) upload completes.
- S3 (:mod:`lopd.s3`) goes through boto3's transfer manager (multipart, parallel parts) with
  botocore's retry modes. Endpoint and credentials come from the standard AWS environment only
  (``AWS_ENDPOINT_URL``, the credential chain, IRSA); nothing here reads them from a recipe.
- Everything streams: hashing, uploading and downloading never hold a whole file in memory.
- :meth:`Store.fetch` downloads into a local cache keyed by sha256 and verifies the hash.

This module knows nothing of torch or of manifests (see :mod:`lopd.lineage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
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
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_stream(f: IO[bytes]) -> tuple[str, int]:
    """sha256 and byte count of a readable stream."""
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def cache_dir() -> Path:
    """Local download cache (``LOPD_CACHE``, default ``~/.cache/lopd``)."""
    return Path(os.environ.get("LOPD_CACHE", Path.home() / ".cache" / "lopd"))


def _clean_key(key: str) -> str:
    key = key.strip("/")
    if any(part in ("..", ".") for part in key.split("/")):
        raise StoreError(f"invalid store key {key!r}")
    return key


class Store:
    """Common interface; use :func:`open_store` to get one."""

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

    # -- derived
    def url(self, key: str = "") -> str:
        key = _clean_key(key)
        return self.uri.rstrip("/") + ("/" + key if key else "")

    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` under this one."""
        return open_store(self.url(prefix))

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
        prefix = _clean_key(prefix)
        out = []
        for obj in self.list(prefix):
            rel = obj.key[len(prefix) :].lstrip("/") if prefix else obj.key
            dest = Path(local) / rel
            self.get_file(obj.key, dest)
            out.append(dest)
        return out

    def fetch(self, key: str, sha256: str, size: int | None = None) -> Path:
        """Download ``key`` into the sha256-keyed cache (once) and verify it; returns the path."""
        dest = cache_dir() / "blobs" / sha256[:2] / sha256
        if dest.exists() and (size is None or dest.stat().st_size == size):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            self.get_file(key, tmp)
            got = sha256_file(tmp)
            if got != sha256:
                raise IntegrityError(f"{self.url(key)}: sha256 {got} does not match the manifest's {sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def hash_object(self, key: str) -> tuple[str, int]:
        """sha256 and size of a stored object, streamed."""
        with self.open(key) as f:
            return sha256_stream(f)


class FileStore(Store):
    """A directory on a local or mounted filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.uri = "file://" + self.root.as_posix()

    def _path(self, key: str) -> Path:
        key = _clean_key(key)
        return self.root / key if key else self.root

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

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            return [ObjectInfo(_clean_key(prefix), base.stat().st_size)]
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".part")):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, prefix: str) -> None:
        p = self._path(prefix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def open_store(uri: str | Path) -> Store:
    """A store for ``s3://bucket/prefix``, ``file:///path`` or a bare path."""
    uri = str(uri)
    if uri.startswith("s3://"):
        from lopd.s3 import S3Store

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

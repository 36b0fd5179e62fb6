"""The S3 backend of the artifact store: boto3 transfer manager, botocore retries.

Endpoint and credentials come from the standard AWS environment only (``AWS_ENDPOINT_URL``,
the credential chain, IRSA on EKS). Objects appear only when their (multipart) upload
completes, so a killed or failed upload never leaves a partial object.
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lopd.store.base import Store
from lopd.store.common import CHUNK, NotFound, ObjectInfo, StoreError, clean_key, pwrite_all
from lopd.store.verified import fill_hashing

log = logging.getLogger(__name__)


class S3Store(Store):
    """An S3 bucket/prefix through boto3 (transfer manager, retries from botocore)."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self._key(prefix))

    def _err(self, op: str, key: str, e: Exception) -> StoreError:
        from botocore.exceptions import ClientError

        code = ""
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFound(f"not found: {self.url(key)}")
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return StoreError(f"{op} {self.url(key)} failed: {msg}")

    def _transfer(self, op: str, key: str, fn):
        """Run a whole transfer; botocore retries each request, and when those retries are
        exhausted by a connection-level fault (endpoint restarting) the transfer is retried
        from scratch a few times (``LOPD_S3_TRANSFER_RETRIES``, default 3) before failing."""
        attempts = int(os.environ.get("LOPD_S3_TRANSFER_RETRIES", "3")) + 1
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as e:  # S3UploadFailedError, ClientError, EndpointConnectionError, ...
                if attempt + 1 < attempts and _is_transient(e):
                    log.warning("%s %s: transient failure (%s); retrying the transfer", op, self.url(key), e)
                    time.sleep(2.0 * (attempt + 1))
                    continue
                if isinstance(e, StoreError):  # already one line naming the object
                    raise
                raise self._err(op, key, e) from e

    def put_file(self, local: str | Path, key: str) -> None:
        if not Path(local).is_file():
            raise StoreError(f"upload to {self.url(key)}: local file not found: {local}")
        self._transfer("upload to", key, lambda: self.client.upload_file(
            str(local), self.bucket, self._key(key), Config=transfer_config()))

    def get_file(self, key: str, local: str | Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            self._transfer("download of", key, lambda: self.client.download_file(
                self.bucket, self._key(key), str(tmp), Config=transfer_config()))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _stream_into(self, key: str, dest: Path, algorithm: str) -> tuple[str, int]:
        return self._transfer("download of", key, lambda: self._ranged_into(key, dest, algorithm))

    def _ranged_into(self, key: str, dest: Path, algorithm: str) -> tuple[str, int]:
        """Download ``key`` into ``dest`` as parallel ranged GETs (``LOPD_S3_CONCURRENCY`` at a time,
        ``LOPD_S3_PART_MB`` each) while this thread hashes the file in order behind them
        (:func:`fill_hashing`: the hash overlaps the download instead of following it, and covers
        the bytes of ``dest`` itself); returns its digest and size. A range that comes back short
        fails the transfer; an object replaced meanwhile fails the caller's hash check."""
        full = self._key(key)
        size = self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]

        def fill(fd: int, start: int, end: int) -> None:
            body = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}")["Body"]
            pos = start
            while pos < end and (chunk := body.read(min(CHUNK, end - pos))):
                pwrite_all(fd, chunk, pos)
                pos += len(chunk)
            body.close()
            if pos != end:
                raise StoreError(f"download of {self.url(key)} failed: bytes {start}-{end - 1} came back short")

        cfg = transfer_config()
        return fill_hashing(dest, size, fill, cfg.multipart_chunksize, cfg.max_concurrency, algorithm)

    def open(self, key: str) -> IO[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as e:
            raise self._err("read of", key, e) from e
        return _BodyStream(body)

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except Exception as e:
            raise self._err("write of", key, e) from e

    def _iter(self, prefix: str) -> Iterator[dict]:
        full = self._key(prefix)
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full + "/" if full else ""
            ):
                yield from page.get("Contents", [])
        except Exception as e:
            raise self._err("listing of", prefix, e) from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = [ObjectInfo(o["Key"][strip:], o["Size"]) for o in self._iter(prefix)]
        if not out and prefix and self.exists(prefix):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(prefix))
            out = [ObjectInfo(clean_key(prefix), head["ContentLength"])]
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            err = self._err("lookup of", key, e)
            if isinstance(err, NotFound):
                return False
            raise err from e

    def delete(self, prefix: str) -> None:
        keys = [o["Key"] for o in self._iter(prefix)]
        if not keys and self.exists(prefix):
            keys = [self._key(prefix)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )


def _is_transient(e: Exception) -> bool:
    """Connection-level failures worth retrying a whole transfer for (never 4xx answers)."""
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    transient = (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectionError)
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, transient) or "Could not connect" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _BodyStream(io.RawIOBase):
    """A file-like wrapper over a botocore StreamingBody (readinto for io.BufferedReader users)."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._body.read() if n is None or n < 0 else self._body.read(n)

    def readinto(self, b) -> int:
        data = self._body.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def s3_client():
    """A boto3 S3 client from the standard AWS environment, with botocore's retries.

    Retry mode and attempts follow ``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` when set
    (defaults: standard, 10 attempts).
    """
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10")),
        },
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=cfg)


def transfer_config():
    """Multipart transfers: 16 MiB parts, 8 in parallel (bounded memory, ~2 GiB files fine)."""
    from boto3.s3.transfer import TransferConfig

    mb = 1 << 20
    return TransferConfig(
        multipart_threshold=16 * mb,
        multipart_chunksize=int(os.environ.get("LOPD_S3_PART_MB", "16")) * mb,
        max_concurrency=int(os.environ.get("LOPD_S3_CONCURRENCY", "8")),
        use_threads=True,
    )

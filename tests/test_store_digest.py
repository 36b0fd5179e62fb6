"""Content digests (BLAKE3; sha256 from older manifests) and the sequential verified read
(:meth:`Store.stream_verified`), on both backends (file:// and a real SeaweedFS s3://)."""

from __future__ import annotations

import hashlib
import os

import blake3
import pytest

from lopd.manifest import FileEntry
from lopd.store import (
    CHUNK,
    FileStore,
    IntegrityError,
    NotFound,
    algorithm_of,
    common,
    digest_bytes,
    file_digest,
    open_store,
    verified,
)
from lopd.store.common import DEPTH, digest_fd


def test_digests_name_their_algorithm(tmp_path):
    data = os.urandom(CHUNK + 7)
    assert digest_bytes(data) == "blake3:" + blake3.blake3(data).hexdigest()
    assert digest_bytes(data, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f") == digest_bytes(data)
    assert file_digest(tmp_path / "f", "sha256") == digest_bytes(data, "sha256")
    for bad in (blake3.blake3(data).hexdigest(), "md5:" + "0" * 64, "blake3:" + "0" * 63, "blake3" + "0" * 64):
        with pytest.raises(ValueError, match="not a content digest"):
            algorithm_of(bad)


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, DEPTH * CHUNK + 3, 3 * DEPTH * CHUNK + 1])
def test_hash_pass_equals_the_digest_of_the_bytes(tmp_path, n):
    data = os.urandom(n)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        for algorithm in ("blake3", "sha256"):
            assert digest_fd(fd, algorithm) == (digest_bytes(data, algorithm), n)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # positional reads: the offset did not move
    finally:
        os.close(fd)


def test_hash_pass_and_stream_raise_what_their_hashing_thread_raised(tmp_path, monkeypatch):
    class Broken:
        def update(self, _):
            raise MemoryError("hasher out of memory")

    data = os.urandom(3 * DEPTH * CHUNK)
    (tmp_path / "f").write_bytes(data)
    digest = digest_bytes(data)
    for module in (common, verified):
        monkeypatch.setattr(module, "new_hasher", lambda algorithm: Broken())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(MemoryError, match="hasher out of memory"):  # raised, not a reader left waiting
            common.digest_fd(fd)
    finally:
        os.close(fd)
    with pytest.raises(MemoryError, match="hasher out of memory"):
        with FileStore(tmp_path).stream_verified("f", digest, len(data)) as f:
            while f.read(CHUNK):
                pass


def test_stream_verified_hands_out_bytes_and_refuses_them_at_the_end(store_uri):
    s = open_store(store_uri)
    data = os.urandom(3 * CHUNK + 5)
    good = digest_bytes(data)
    s.write_bytes("part.bin", data)
    with s.stream_verified("part.bin", good, len(data)) as f:
        assert f.read() == data
    bad = bytearray(data)
    bad[-1] ^= 1  # one bit in the last chunk
    s.write_bytes("bad.bin", bytes(bad))
    f = s.stream_verified("bad.bin", good, len(data))
    assert f.read(CHUNK) == bytes(bad[:CHUNK])  # the bytes come before the verdict...
    want = f"bad.bin: digest blake3:[0-9a-f]{{64}} does not match the manifest's {good}; refusing what was read"
    with pytest.raises(IntegrityError, match=want):
        f.read()  # ...and the read that reaches the end refuses them
    f.close()  # refused once; closing adds nothing
    with pytest.raises(IntegrityError, match=want):  # a reader that stops early learns on close
        with s.stream_verified("bad.bin", good, len(data)) as f:
            assert len(f.read(10)) == 10
    s.write_bytes("long.bin", data + b"x")
    with pytest.raises(IntegrityError, match=f"long.bin: more than the manifest's {len(data)} bytes"):
        with s.stream_verified("long.bin", good, len(data)) as f:
            f.read()
    s.write_bytes("short.bin", data[:-1])
    with pytest.raises(IntegrityError, match=f"short.bin: {len(data) - 1} bytes, the manifest says {len(data)}"):
        with s.stream_verified("short.bin", good, len(data)) as f:
            f.read()
    with pytest.raises(NotFound):
        s.stream_verified("absent.bin", good, len(data))


def test_file_store_stream_of_a_published_file_hashes_nothing(tmp_path, monkeypatch):
    s = FileStore(tmp_path / "store")
    local = tmp_path / "part.bin"
    data = os.urandom(2 * CHUNK + 1)
    local.write_bytes(data)
    digest = file_digest(local)  # the publisher hashes it for its manifest and uploads it
    s.put_file(local, "part.bin")
    hashers: list[str] = []
    real = common.new_hasher
    for module in (common, verified):  # the hash pass's and the stream's hasher
        monkeypatch.setattr(module, "new_hasher", lambda algorithm: hashers.append(algorithm) or real(algorithm))
    with s.stream_verified("part.bin", digest, len(data)) as f:
        assert f.read() == data
    assert hashers == []  # registered signature: read in place, checked on close
    s.write_bytes("part.bin", data[::-1])  # replaced: hashed as it is read, and refused
    with pytest.raises(IntegrityError, match="part.bin: digest"):
        with s.stream_verified("part.bin", digest, len(data)) as f:
            f.read()
    assert hashers == ["blake3"]


def test_a_manifest_of_sha256_digests_still_verifies(store_uri):
    s = open_store(store_uri)
    data = os.urandom(CHUNK + 3)
    legacy = FileEntry.model_validate({"path": "p.bin", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    assert legacy.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert legacy.model_dump() == {"path": "p.bin", "bytes": len(data), "digest": legacy.digest}
    s.write_bytes("p.bin", data)
    with s.open_verified("p.bin", legacy.digest, legacy.bytes) as f:
        assert f.read() == data
    with s.stream_verified("p.bin", legacy.digest, legacy.bytes) as f:
        assert f.read() == data
    assert s.fetch("p.bin", legacy.digest, legacy.bytes).parts[-3] == "sha256"
    assert s.hash_object("p.bin", "sha256") == (legacy.digest, len(data))
    s.write_bytes("q.bin", data[::-1])  # (open_verified on s3 would serve p.bin's verified blob: same digest)
    with pytest.raises(IntegrityError, match="q.bin: digest sha256:[0-9a-f]{64} does not match"):
        with s.stream_verified("q.bin", legacy.digest, legacy.bytes) as f:
            f.read()
    with pytest.raises(ValueError, match="digest"):
        FileEntry.model_validate({"path": "p.bin", "bytes": 1, "sha256": "nothex"})

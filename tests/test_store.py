"""Store round-trips on both backends (file:// and a real SeaweedFS s3://)."""

from __future__ import annotations

import os

import blake3
import pytest

from lopd.store import FileStore, IntegrityError, NotFound, StoreError, cache_dir, digest_bytes, file_digest, open_store


def test_open_store_schemes(tmp_path):
    assert isinstance(open_store(tmp_path), FileStore)
    assert open_store(f"file://{tmp_path}").uri == f"file://{tmp_path}"
    s3 = open_store("s3://bucket/a/b/")
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "a/b", "s3://bucket/a/b")
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket")


def test_file_round_trip(store_uri, tmp_path):
    s = open_store(store_uri)
    src = tmp_path / "src.bin"
    data = os.urandom(3 * (1 << 20) + 17)
    src.write_bytes(data)
    s.put_file(src, "a/b/src.bin")
    assert s.exists("a/b/src.bin") and not s.exists("a/b/other")
    s.get_file("a/b/src.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == data
    assert s.hash_object("a/b/src.bin") == (digest_bytes(data), len(data))


def test_json_bytes_list_delete(store_uri):
    s = open_store(store_uri)
    s.write_json("x/m.json", {"b": 1, "a": [1, 2]})
    s.write_bytes("x/y/z.txt", b"hello")
    s.write_bytes("xx/other.txt", b"not under x/")
    assert s.read_json("x/m.json") == {"a": [1, 2], "b": 1}
    assert s.read_bytes("x/y/z.txt") == b"hello"
    assert [o.key for o in s.list("x")] == ["x/m.json", "x/y/z.txt"]
    assert [(o.key, o.size) for o in s.list("x/y/z.txt")] == [("x/y/z.txt", 5)]
    assert [o.key for o in s.list()] == ["x/m.json", "x/y/z.txt", "xx/other.txt"]
    assert s.list("nothing-here") == []
    s.delete("x")
    assert [o.key for o in s.list()] == ["xx/other.txt"]
    with pytest.raises(NotFound, match="not found: .*x/m.json"):
        s.read_bytes("x/m.json")


def test_child_store_and_keys(store_uri):
    s = open_store(store_uri)
    c = s.child("runs/r1")
    c.write_bytes("sft/a.txt", b"1")
    assert s.read_bytes("runs/r1/sft/a.txt") == b"1"
    assert [o.key for o in c.list()] == ["sft/a.txt"]
    with pytest.raises(StoreError, match="invalid store key"):
        s.read_bytes("../escape")


def test_dir_round_trip_and_streaming_read(store_uri, tmp_path):
    s = open_store(store_uri)
    src = tmp_path / "d"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(os.urandom(2 << 20))
    assert s.put_dir(src, "pre") == ["pre/a.txt", "pre/sub/b.bin"]
    got = s.get_dir("pre", tmp_path / "back")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in got) == ["a.txt", "sub/b.bin"]
    assert (tmp_path / "back/sub/b.bin").read_bytes() == (src / "sub/b.bin").read_bytes()
    h = blake3.blake3()
    with s.open("pre/sub/b.bin") as f:
        chunks = 0
        while chunk := f.read(256 * 1024):
            h.update(chunk)
            chunks += 1
    assert chunks >= 8 and "blake3:" + h.hexdigest() == file_digest(src / "sub/b.bin")


def test_fetch_cache_verifies(store_uri, tmp_path):
    s = open_store(store_uri)
    s.write_bytes("blob", b"payload")
    good = digest_bytes(b"payload")
    p = s.fetch("blob", good, 7)
    assert p.read_bytes() == b"payload" and p.parts[-3:] == ("blake3", good[7:9], good[7:])
    assert s.fetch("blob", good, 7) == p  # cached
    bad = digest_bytes(b"other")
    with pytest.raises(IntegrityError, match="does not match"):
        s.fetch("blob", bad)
    assert not list(p.parent.parent.rglob(f"*{bad}*"))  # nothing left in the cache


def test_missing_objects(store_uri, tmp_path):
    s = open_store(store_uri)
    with pytest.raises(NotFound):
        s.get_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(StoreError, match="local file not found"):
        s.put_file(tmp_path / "absent", "k")


def test_file_store_hides_partial_temp_files(tmp_path):
    s = FileStore(tmp_path)
    s.write_bytes("a", b"1")
    (tmp_path / ".b.123.part").write_bytes(b"partial")
    assert [o.key for o in s.list()] == ["a"]


def _corrupt_in_place(path, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` (same size) and put its mtime back."""
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_fetch_cache_hit_rests_on_content(store_uri):
    s = open_store(store_uri)
    s.write_bytes("blob", b"payload")
    good = digest_bytes(b"payload")
    p = s.fetch("blob", good, 7)
    _corrupt_in_place(p, b"PAYLOAD")  # same name, same size, same mtime, other bytes
    assert s.fetch("blob", good, 7).read_bytes() == b"payload"  # re-verified, downloaded again
    with s.open_verified("blob", good, 7) as f:
        assert f.read() == b"payload"
    # when the stored object went bad too, the bad bytes are never returned
    _corrupt_in_place(p, b"PAYLOAD")
    s.write_bytes("blob", b"xayload")
    want = f"blob: digest blake3:[0-9a-f]{{64}} does not match the manifest's {good}"
    with pytest.raises(IntegrityError, match=want):
        s.fetch("blob", good, 7)
    assert not p.exists()


def test_open_verified_rejects_a_rewritten_object(store_uri):
    s = open_store(store_uri)
    data = os.urandom(3 * (1 << 20) + 5)
    sha = digest_bytes(data)
    other = os.urandom(len(data))  # rewritten after the record was made: same size, other bytes
    s.write_bytes("part.parquet", other)
    with pytest.raises(IntegrityError) as e:
        s.open_verified("part.parquet", sha, len(data))
    msg = str(e.value)
    assert "\n" not in msg and "part.parquet" in msg and sha in msg and digest_bytes(other) in msg
    assert not list((cache_dir() / "blobs").rglob(f"*{sha}*"))
    s.write_bytes("part.parquet", data)
    with s.open_verified("part.parquet", sha, len(data)) as f:
        assert f.seekable() and f.read() == data
    with pytest.raises(IntegrityError, match=r"short: 2 bytes, the manifest says 7"):
        s.write_bytes("short", b"ab")
        s.open_verified("short", good_sha := digest_bytes(b"payload"), 7)
    assert not list((cache_dir() / "blobs").rglob(f"*{good_sha}*"))  # nothing half-written is cached


def test_file_store_delete_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sentinel").write_text("keep")
    (outside / "sub" / "sentinel").write_text("keep")
    s = FileStore(tmp_path / "store")
    s.write_bytes("a/b/x.txt", b"1")
    (tmp_path / "store/a/b/link").symlink_to(outside / "sub")  # a link inside a directory
    (tmp_path / "store/a/file-link").symlink_to(outside / "sentinel")
    (tmp_path / "store/dir-link").symlink_to(outside)
    s.delete("a/file-link")  # the link goes, its target stays
    assert not (tmp_path / "store/a/file-link").is_symlink() and (outside / "sentinel").exists()
    s.delete("dir-link")
    assert not (tmp_path / "store/dir-link").is_symlink() and (outside / "sentinel").exists()
    s.delete("a")  # recursion removes the link without entering it
    assert not (tmp_path / "store/a").exists() and (outside / "sub" / "sentinel").exists()
    (tmp_path / "store/runs").symlink_to(outside)  # a directory that resolves outside the root
    with pytest.raises(StoreError, match=r"resolves to .*outside/sentinel, outside the store root") as e:
        s.delete("runs/sentinel")
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="outside the store root"):
        s.delete("runs/sub")
    assert (outside / "sentinel").exists() and (outside / "sub" / "sentinel").exists()
    with pytest.raises(StoreError, match="outside the store root"):
        s.check_within("runs/t/sft-data")
    s.check_within("a/b")  # inside (and absent): fine


def test_verified_download_in_parts_hashes_them_in_order(store_uri, monkeypatch):
    monkeypatch.setenv("LOPD_S3_PART_MB", "1")  # s3: 1 MiB ranged GETs, two at a time
    monkeypatch.setenv("LOPD_S3_CONCURRENCY", "2")
    s = open_store(store_uri)
    mib = 1 << 20
    data = os.urandom(5 * mib + 3)
    sha = digest_bytes(data)
    swapped = data[mib : 2 * mib] + data[:mib] + data[2 * mib :]  # same bytes, two parts in the other order
    s.write_bytes("swapped.bin", swapped)
    with pytest.raises(IntegrityError, match="swapped.bin: digest blake3:"):
        s.fetch("swapped.bin", sha, len(data))
    flipped = bytearray(data)
    flipped[-2] ^= 1  # one bit in the last, short part
    s.write_bytes("flipped.bin", bytes(flipped))
    with pytest.raises(IntegrityError, match="flipped.bin: digest blake3:"):
        s.fetch("flipped.bin", sha, len(data))
    assert not [p for p in (cache_dir() / "blobs").rglob("*") if p.is_file()]
    s.write_bytes("parts.bin", data)
    with s.open_verified("parts.bin", sha, len(data)) as f:
        assert f.read() == data
    s.write_bytes("empty", b"")
    assert s.fetch("empty", digest_bytes(b""), 0).read_bytes() == b""


def test_cache_hit_is_not_rehashed_until_its_signature_moves(tmp_path, monkeypatch):
    from lopd.store import verified

    s = FileStore(tmp_path / "store")
    s.write_bytes("blob", b"payload")
    good = digest_bytes(b"payload")
    p = s.fetch("blob", good, 7)
    hashed = []
    monkeypatch.setattr(verified, "file_digest",
                        lambda path, algorithm=None: hashed.append(path) or file_digest(path, algorithm))
    for _ in range(3):
        assert s.fetch("blob", good, 7) == p
    assert hashed == []  # signature unchanged: trusted without reading the blob
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same times, but the ctime moves
    assert s.fetch("blob", good, 7) == p and hashed == [p]


def _count_hashing(monkeypatch) -> list:
    """Record every in-place hash a file store's verified read takes."""
    from lopd.store import local

    hashed: list = []
    real = local.digest_fd
    monkeypatch.setattr(local, "digest_fd", lambda fd, algorithm: hashed.append(fd) or real(fd, algorithm))
    return hashed


def test_file_store_verified_read_is_in_place_and_registered(tmp_path, monkeypatch):
    s = FileStore(tmp_path / "store")
    data = os.urandom((1 << 20) + 9)
    sha = digest_bytes(data)
    s.write_bytes("part.bin", data)  # not hashed by anyone yet
    hashed = _count_hashing(monkeypatch)
    for _ in range(2):
        with s.open_verified("part.bin", sha, len(data)) as f:
            assert f.seekable() and f.read() == data
    assert len(hashed) == 1  # hashed once, in place; the second read trusts the registered signature
    assert not (cache_dir() / "blobs").exists()  # no private copy
    os.utime(tmp_path / "store" / "part.bin")  # a touch moves the signature: hashed again
    with s.open_verified("part.bin", sha, len(data)) as f:
        assert f.read() == data
    assert len(hashed) == 2


def test_published_file_is_trusted_until_it_is_tampered_with(tmp_path, monkeypatch):
    s = FileStore(tmp_path / "store")
    local = tmp_path / "part.bin"
    data = os.urandom(2 * (1 << 20) + 1)
    local.write_bytes(data)
    sha = file_digest(local)  # the publisher hashes it for its manifest...
    s.put_file(local, "p/part.bin")  # ...and uploads it: the copy is registered with that hash
    hashed = _count_hashing(monkeypatch)
    with s.open_verified("p/part.bin", sha, len(data)) as f:
        assert f.read() == data
    assert s.fetch("p/part.bin", sha, len(data)).read_bytes() == data  # copied into the cache unhashed
    assert hashed == []
    # tampered in place after publishing (same size, mtime put back): the registered signature
    # no longer matches, so the first read rehashes and refuses it
    bad = bytearray(data)
    bad[12345] ^= 1
    _corrupt_in_place(tmp_path / "store" / "p" / "part.bin", bytes(bad))
    want = f"part.bin: digest blake3:[0-9a-f]{{64}} does not match the manifest's {sha}"
    with pytest.raises(IntegrityError, match=want):
        s.open_verified("p/part.bin", sha, len(data))
    assert len(hashed) == 1
    # replaced by another file with other bytes: refused too
    s.write_bytes("p/part.bin", bytes(bad))
    with pytest.raises(IntegrityError, match="does not match"):
        s.open_verified("p/part.bin", sha, len(data))


def test_publisher_file_changed_before_upload_is_not_registered(tmp_path):
    s = FileStore(tmp_path / "store")
    local = tmp_path / "part.bin"
    local.write_bytes(b"payload")
    sha = file_digest(local)
    _corrupt_in_place(local, b"PAYLOAD")  # changed between the manifest's hash and the upload
    s.put_file(local, "part.bin")
    with pytest.raises(IntegrityError, match="does not match"):
        s.open_verified("part.bin", sha, 7)
    with pytest.raises(IntegrityError, match="does not match"):
        s.fetch("part.bin", sha, 7)
    assert not [p for p in (cache_dir() / "blobs").rglob("*") if p.is_file()]


def test_bytes_changed_while_being_read_are_refused_on_close(store_uri, tmp_path):
    s = open_store(store_uri)
    data = os.urandom(1 << 20)
    sha = digest_bytes(data)
    s.write_bytes("part.bin", data)
    f = s.open_verified("part.bin", sha, len(data))
    underneath = (tmp_path / "store" / "part.bin") if store_uri.startswith("file://") else s.fetch("part.bin", sha)
    head = f.read(1000)
    _corrupt_in_place(underneath, b"X" * 1000)  # the verified file is written under the reader
    with pytest.raises(IntegrityError, match="changed while it was being read"):
        with f:
            assert head == data[:1000]
            f.read()
    assert f.closed


def test_a_second_verified_copy_never_replaces_a_blob_under_its_reader(tmp_path, s3_server):
    from lopd.store import base

    s = open_store(f"s3://lopd-test/t-install-{os.getpid()}")
    data = os.urandom(1 << 16)
    sha = digest_bytes(data)
    s.write_bytes("part.bin", data)
    with s.open_verified("part.bin", sha, len(data)) as f:
        late = tmp_path / "late.part"  # what a process that also missed the cache verified meanwhile
        late.write_bytes(data)
        assert base._install(late, s.fetch("part.bin", sha)) is False
        assert f.read() == data
    # closed without complaint: the blob under the reader was left alone

"""Store round-trips on both backends (file:// and a real SeaweedFS s3://)."""

from __future__ import annotations

import hashlib
import os

import pytest

from lopd.store import FileStore, IntegrityError, NotFound, StoreError, open_store, sha256_file


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
    assert s.hash_object("a/b/src.bin") == (hashlib.sha256(data).hexdigest(), len(data))


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
    h = hashlib.sha256()
    with s.open("pre/sub/b.bin") as f:
        chunks = 0
        while chunk := f.read(256 * 1024):
            h.update(chunk)
            chunks += 1
    assert chunks >= 8 and h.hexdigest() == sha256_file(src / "sub/b.bin")


def test_fetch_cache_verifies(store_uri, tmp_path):
    s = open_store(store_uri)
    s.write_bytes("blob", b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    p = s.fetch("blob", good, 7)
    assert p.read_bytes() == b"payload" and good in p.name
    assert s.fetch("blob", good, 7) == p  # cached
    bad = hashlib.sha256(b"other").hexdigest()
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

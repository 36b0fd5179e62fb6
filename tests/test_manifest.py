"""Stage manifests (lopd.manifest): written last and verified on read (tampered, missing,
malformed), a writer killed mid-upload leaves none, and shard finalisation (two shards finishing
at once give one valid manifest; it waits for every shard)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lopd.layout import shard_prefix
from lopd.manifest import ManifestError, fetch, finalize_shards, publish, read_manifest
from lopd.store import IntegrityError, open_store
from tests.helpers.cli import REPO


def make_dir(root, files: dict[str, bytes]):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_publish_read_verify_fetch(store_uri, tmp_path):
    s = open_store(store_uri)
    src = make_dir(tmp_path / "out", {"a.parquet": b"x" * 1000, "sub/b.json": b"{}"})
    m = publish(s, "runs/r/sft-data", src, stage="sft-data", run_id="r",
                lineage={"teacher_fingerprint": "f" * 64}, metrics={"rows": 3})
    got, sha = read_manifest(s, "runs/r/sft-data", verify=True)
    assert got == m and len(sha) == 64
    assert [f.path for f in got.files] == ["a.parquet", "sub/b.json"]
    dest = fetch(s, "runs/r/sft-data", tmp_path / "local")
    assert (dest / "sub/b.json").read_bytes() == b"{}" and (dest / "MANIFEST.json").exists()


def test_prefix_without_manifest_is_refused(store_uri):
    s = open_store(store_uri)
    s.write_bytes("runs/r/sft/a.bin", b"data")
    with pytest.raises(ManifestError, match="no manifest at .*runs/r/sft/MANIFEST.json"):
        read_manifest(s, "runs/r/sft")


def test_tampered_file_is_rejected(store_uri, tmp_path):
    s = open_store(store_uri)
    src = make_dir(tmp_path / "out", {"w.bin": b"original-bytes"})
    publish(s, "art", src, stage="sft", run_id="r")
    s.write_bytes("art/w.bin", b"tampered-bytes")  # same size, other content
    with pytest.raises(ManifestError, match="digest blake3:.* does not match the manifest"):
        read_manifest(s, "art", verify=True)
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        fetch(s, "art", tmp_path / "dl")
    s.write_bytes("art/w.bin", b"short")
    with pytest.raises(ManifestError, match="5 bytes, manifest says 14"):
        read_manifest(s, "art", verify=True)
    s.delete("art/w.bin")
    with pytest.raises(ManifestError, match="listed in the manifest but missing"):
        read_manifest(s, "art", verify=True)


def test_malformed_manifest(store_uri):
    s = open_store(store_uri)
    s.write_bytes("art/MANIFEST.json", b'{"stage": "x"}')
    with pytest.raises(ManifestError, match="malformed manifest"):
        read_manifest(s, "art")


WRITER = textwrap.dedent(
    """
    import shutil, sys, time
    from pathlib import Path
    from lopd.store import open_store
    from lopd.manifest import publish
    def slow_copy(src, dst, length=0, _copy=shutil.copyfileobj):  # a local copy slow enough to be hit
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            time.sleep(0.01)
    shutil.copyfileobj = slow_copy
    store = open_store(sys.argv[1])
    real_put = store.put_file
    def put(local, key):
        print("PUT", key, flush=True)
        real_put(local, key)
        print("DONE", key, flush=True)
        time.sleep(0.05)
    store.put_file = put
    publish(store, "runs/r/precompute", Path(sys.argv[2]), stage="precompute", run_id="r")
    print("PUBLISHED", flush=True)
    """
)


def test_writer_killed_mid_upload_leaves_no_manifest(store_uri, tmp_path):
    files = {f"part-{i:02d}.bin": os.urandom(64 * 1024) for i in range(6)}
    files["zz-big.bin"] = os.urandom(160 << 20)  # a multipart upload on S3
    src = make_dir(tmp_path / "out", files)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, store_uri, str(src)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=os.environ.copy())
    for line in proc.stdout:
        if line.startswith("PUT") and "zz-big" in line:
            time.sleep(0.4)  # well inside the big upload
            break
    assert proc.poll() is None, "the writer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = open_store(store_uri)
    assert not s.exists("runs/r/precompute/MANIFEST.json")
    with pytest.raises(ManifestError, match="missing or incomplete"):
        read_manifest(s, "runs/r/precompute")
    assert s.exists("runs/r/precompute/part-00.bin")  # some work had landed...
    big = [o for o in s.list("runs/r/precompute") if "zz-big" in o.key]
    assert all(o.size == len(files["zz-big.bin"]) for o in big)  # ...but never a partial object
    # re-running completes it
    rerun = subprocess.run([sys.executable, "-c", WRITER, store_uri, str(src)], capture_output=True,
                           text=True, cwd=REPO, env=os.environ.copy())
    assert rerun.returncode == 0, rerun.stderr
    m, _ = read_manifest(s, "runs/r/precompute", verify=True)
    assert len(m.files) == 7


SHARD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lopd.store import open_store
    from lopd.layout import shard_prefix
    from lopd.manifest import finalize_shards, publish
    store = open_store(sys.argv[1]); i = int(sys.argv[2]); out = Path(sys.argv[3]); barrier = Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True); (out / "data.parquet").write_bytes(bytes([i]) * 1000)
    publish(store, shard_prefix("runs/r/sft-data", i, 2), out, stage="sft-data", run_id="r",
            shard={"index": i, "count": 2}, lineage={"teacher_fingerprint": "t" * 64}, metrics={"rows": 10 + i},
            created_at=f"2026-01-01T00:00:0{i}Z")
    (barrier / f"ready-{i}").touch()  # both shards published: finalise at the same moment
    while len(list(barrier.glob("ready-*"))) < 2:
        time.sleep(0.001)
    m = finalize_shards(store, "runs/r/sft-data", 2)
    print("FINAL" if m else "NONE", flush=True)
    """
)


def test_two_shards_finishing_at_once_give_one_valid_manifest(store_uri, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", SHARD, store_uri, str(i), str(tmp_path / f"s{i}"), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=os.environ.copy()) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert [o[0].strip() for o in outs] == ["FINAL", "FINAL"]
    s = open_store(store_uri)
    m, sha = read_manifest(s, "runs/r/sft-data", verify=True)
    assert [f.path for f in m.files] == ["shards/0-of-2/data.parquet", "shards/1-of-2/data.parquet"]
    assert m.metrics == {"rows": 21} and m.created_at == "2026-01-01T00:00:01Z"
    assert set(m.lineage["shards"]) == {"shards/0-of-2", "shards/1-of-2"}
    # idempotent: finalising again writes the very same bytes
    before = s.read_bytes("runs/r/sft-data/MANIFEST.json")
    finalize_shards(s, "runs/r/sft-data", 2)
    assert s.read_bytes("runs/r/sft-data/MANIFEST.json") == before


def test_finalize_waits_for_all_shards(store_uri, tmp_path):
    s = open_store(store_uri)
    src = make_dir(tmp_path / "s0", {"d": b"0"})
    publish(s, shard_prefix("st", 0, 3), src, stage="x", run_id="r", shard={"index": 0, "count": 3})
    assert finalize_shards(s, "st", 3) is None
    assert not s.exists("st/MANIFEST.json")
    with pytest.raises(ManifestError, match="shard index 3 out of range for 3 shards"):
        shard_prefix("st", 3, 3)

"""Store benchmark: upload and download through a real SeaweedFS S3 server, and what read-time
verification costs on the file store and on the S3 store.

Every measurement runs in a fresh child process that reports its time and peak RSS (target
< 300 MB: files stream, never held in memory). Reads are measured side by side on the same
object, interleaved and repeated (medians kept):

- ``plain``: a sequential read of the object (``Store.open``), nothing verified;
- ``plain_copy``: an unverified local copy (``Store.get_file``: boto3's parallel download, a
  kernel copy for the file store), then read: what the cache's copy costs without any hashing;
- ``verified_first``: ``Store.open_verified`` from an empty cache (the object is copied into the
  sha256 cache and hashed on the way, then the verified copy is read as a reader would);
- ``verified_cached``: ``Store.open_verified`` again (the copy's stat signature is unchanged, so
  it is not rehashed), then the copy is read;
- ``verified_first_published`` (file store only, its own line): the object was published from
  this machine first, as a stage does (``sha256_file`` of the local file for the manifest, then
  ``Store.put_file``; not timed), so its signature is registered; then ``Store.open_verified``
  is timed in a fresh process as for ``verified_first``.

The file store verifies and reads its files in place (no cache copy); ``verified_first`` there
is one sha256 pass of the file, then the read.

``plain`` and ``verified_cached`` run three times per process (median kept), the others once.

The target: verification costs < 10% of the read time (``overhead_fraction`` = verified time /
plain time - 1; ``overhead_vs_plain_copy`` sets the verified read against the unverified copy,
isolating the hashing). One JSON line per measurement.

    .venv/bin/python tests/benchmarks/bench_store.py [--gib 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.seaweed import BUCKET, SeaweedServer  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from lopd.store import open_store, sha256_file
op, uri, key, path, sha, size, times = sys.argv[1:8]
s = open_store(uri)
seconds = []
for _ in range(int(times)):
    t = time.perf_counter()
    if op == "put":
        s.put_file(path, key)
    elif op == "publish":
        sha256_file(path)
        s.put_file(path, key)
    elif op == "get":
        s.get_file(key, path)
    elif op in ("read", "read_verified", "copy_read"):
        if op == "copy_read":
            s.get_file(key, path)
        opened = {"read": lambda: s.open(key), "copy_read": lambda: open(path, "rb"),
                  "read_verified": lambda: s.open_verified(key, sha, int(size))}[op]
        with opened() as f:
            n = 0
            while chunk := f.read(1 << 20):
                n += len(chunk)
        assert n == int(size), (n, size)
    else:
        sha256_file(path)
    seconds.append(time.perf_counter() - t)
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TARGET = 0.10


def child(op: str, uri: str, key: str, path: Path | str, env: dict, sha: str = "", size: int = 0,
          times: int = 1) -> dict:
    """Run ``op`` ``times`` times in a fresh process; ``seconds`` is the median of its runs."""
    out = subprocess.run([sys.executable, "-c", CHILD, op, uri, key, str(path), sha, str(size), str(times)],
                         capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2], check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {**res, "seconds": statistics.median(res["seconds"])}


def read_lines(store: str, uri: str, size: int, sha: str, env: dict, tmp: Path, repeats: int, gib: float,
               src: Path) -> list[dict]:
    """Plain, first verified and cached verified reads of ``big.bin`` (and, for the file store, the
    first verified read of a copy of ``src`` published from here), interleaved ``repeats`` times."""
    runs: dict[str, list[dict]] = {"plain": [], "plain_copy": [], "verified_first": [], "verified_cached": [],
                                   "verified_first_published": []}
    for i in range(repeats):
        if store == "file":
            published = {**env, "LOPD_CACHE": str(tmp / f"cache-{store}-published-{i}")}
            child("publish", uri, "published.bin", src, published)
            runs["verified_first_published"].append(
                child("read_verified", uri, "published.bin", "", published, sha, size))
            (Path(uri.removeprefix("file://")) / "published.bin").unlink()
            shutil.rmtree(tmp / f"cache-{store}-published-{i}", ignore_errors=True)
        cache = {**env, "LOPD_CACHE": str(tmp / f"cache-{store}-{i}")}
        runs["plain"].append(child("read", uri, "big.bin", "", env, sha, size, times=3))
        runs["plain_copy"].append(child("copy_read", uri, "big.bin", tmp / "copy.bin", env, sha, size))
        (tmp / "copy.bin").unlink()
        runs["verified_first"].append(child("read_verified", uri, "big.bin", "", cache, sha, size))
        runs["verified_cached"].append(child("read_verified", uri, "big.bin", "", cache, sha, size, times=3))
        shutil.rmtree(tmp / f"cache-{store}-{i}", ignore_errors=True)
    mb = size / 1e6
    plain = statistics.median(r["seconds"] for r in runs["plain"])
    copy = statistics.median(r["seconds"] for r in runs["plain_copy"])
    lines = []
    for kind in ("verified_first", "verified_cached", "verified_first_published"):
        if not runs[kind]:
            continue
        t = statistics.median(r["seconds"] for r in runs[kind])
        lines.append({
            "bench": f"store_read_{store}_{gib:g}gib", "read": kind, "bytes": size, "repeats": repeats,
            "plain_MBps": round(mb / plain, 1), "verified_MBps": round(mb / t, 1),
            "overhead_fraction": round(t / plain - 1, 3), "overhead_target": TARGET,
            "meets_target": t / plain - 1 < TARGET,
            "plain_copy_MBps": round(mb / copy, 1), "overhead_vs_plain_copy": round(t / copy - 1, 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[kind]), 1),
        })
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three reads (medians kept)")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(prefix="lopd-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "files" / "big.bin"
        src.parent.mkdir()
        block = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for i in range(size >> 20):
                f.write(block[:-8] + i.to_bytes(8, "little"))
        from lopd.store import sha256_file

        sha = sha256_file(src)
        hashing = child("hash", "", "", src, {})
        print(json.dumps({"bench": f"store_sha256_{args.gib:g}gib", "bytes": size,
                          "sha256_MBps": round(size / 1e6 / hashing["seconds"], 1)}), flush=True)
        for line in read_lines("file", f"file://{src.parent}", size, sha, {}, tmp, args.repeats, args.gib, src):
            print(json.dumps(line), flush=True)
        with SeaweedServer(tmp / "weed") as server:
            env = server.env()
            uri = f"s3://{BUCKET}/bench"
            up = child("put", uri, "big.bin", src, env)
            down = child("get", uri, "big.bin", tmp / "back.bin", env)
            ok = sha == sha256_file(tmp / "back.bin")
            (tmp / "back.bin").unlink()
            peak = max(up["peak_rss_mb"], down["peak_rss_mb"])
            print(json.dumps({
                "bench": f"store_s3_transfer_{args.gib:g}gib", "bytes": size,
                "upload_MBps": round(size / 1e6 / up["seconds"], 1),
                "download_MBps": round(size / 1e6 / down["seconds"], 1),
                "upload_peak_rss_mb": round(up["peak_rss_mb"], 1),
                "download_peak_rss_mb": round(down["peak_rss_mb"], 1),
                "peak_rss_target_mb": 300, "rss_ratio_to_target": round(peak / 300, 3),
                "roundtrip_sha256_equal": ok, "meets_target": ok and peak < 300,
            }), flush=True)
            for line in read_lines("s3", uri, size, sha, env, tmp, args.repeats, args.gib, src):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

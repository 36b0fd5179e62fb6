"""Store benchmark: upload and download through a real SeaweedFS S3 server, and what read-time
verification costs on the file store and on the S3 store.

Every measurement runs in a fresh child process that reports its time and peak RSS (target
< 300 MB: files stream, never held in memory), one timed read per child, after the same
warm-up (imports, the hasher). Each verified read is set against the unverified read a reader
of the same kind would do instead (``baseline``):

- ``plain``: a sequential read of the object (``Store.open``), nothing verified;
- ``plain_copy``: an unverified local copy (``Store.get_file``: boto3's parallel download),
  then read: what a reader that needs random access (parquet) does without verification on S3;
- ``stream_first``: ``Store.stream_verified``, the sequential verified read, bytes hashed on a
  second thread as the reader takes them and refused at the end (baseline ``plain``);
- ``verified_first``: ``Store.open_verified``, the seekable verified read, from an empty cache
  (S3: the object is copied into the digest-keyed cache and hashed on the way, then the copy is
  read, baseline ``plain_copy``; file store: one hashing pass of the file in place, then the
  read, baseline ``plain``);
- ``verified_cached``: ``Store.open_verified`` after an untimed verified read in the same child
  (the copy's or the file's stat signature is registered, so nothing is rehashed);
- ``verified_first_published`` (file store only): the object was published from this machine
  first, as a stage does (``file_digest`` of the local file for the manifest, then
  ``Store.put_file``; not timed), so its signature is registered; then ``Store.open_verified``
  is timed as for ``verified_first``, against ``plain_warm``, a plain read of the same file.

Each round runs every kind once, in the reverse order of the round before; ``overhead_fraction``
is the median over rounds of (verified time / baseline time of the same round) - 1, and
``overhead_range`` its smallest and largest round. File-store reads start cold: each child
drops the file's pages from the page cache (``posix_fadvise(DONTNEED)``) before its timed
read, plain and verified alike, because a file this machine has never seen (the case that
costs a hash) was written elsewhere and is not in its page cache. The published file is the
exception: its publisher just wrote it here, so it and its baseline are read warm. A cold
disk's rate can vary between identical reads, and another process can take the cores, so
each store also has a control line, ``plain_again`` against ``plain`` (the same read twice):
its median should be near 0 and its range is how far two identical reads disagreed in that
run, the resolution of every other line (a run whose control is far from 0 was disturbed).
S3 clients connect before the clock starts.

The target: verification costs < 10% of the read time (``overhead_fraction`` < 0.10).
``*_busy_cores`` is how many of the machine's ``cores`` were busy during the read (all
processes, from ``/proc/stat``): a read that already keeps every core busy leaves no room for
a hashing thread to hide in. One JSON line per measurement, and one for the hash rates
(BLAKE3, which lopd writes, and sha256, which older manifests record): in memory, and as a
pass over a file in the page cache (``file_digest``).

    .venv/bin/python tests/benchmarks/bench_store.py [--gib 2] [--repeats 7] [--stores file,s3]
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
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHILD = r"""
import json, os, resource, sys, time
from lopd.store import file_digest, open_store
from lopd.store.common import new_hasher
op, uri, key, path, digest, size = sys.argv[1:7]
size = int(size)
cold = uri.startswith("file://") and not op.startswith(("warm_", "hash_", "put", "get", "publish"))
op = op.removeprefix("warm_")
new_hasher()  # warm-up, the same for every read: the hasher's module is loaded before the clock
s = open_store(uri) if uri else None
if uri.startswith("s3://"):
    s.exists(key)  # the client and its connection exist before the clock starts
def busy():  # machine-wide busy CPU seconds (every process: the S3 server and the kernel too)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
def read_all(f):
    with f:
        n = 0
        while chunk := f.read(1 << 20):
            n += len(chunk)
    assert n == size, (n, size)
opened = {"read": lambda: s.open(key), "copy_read": lambda: open(path, "rb"),
          "read_verified": lambda: s.open_verified(key, digest, size),
          "read_verified_cached": lambda: s.open_verified(key, digest, size),
          "read_stream": lambda: s.stream_verified(key, digest, size)}
if op == "read_verified_cached":
    read_all(opened[op]())  # untimed: the first verified read registers the file (or fills the cache)
if op.startswith("hash_"):
    file_digest(path, op.removeprefix("hash_"))  # untimed: the file is in the page cache
if cold:  # drop the file's pages: a file this machine has never seen is not in its page cache
    fd = os.open(os.path.join(uri[len("file://"):], key), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
out = {}
t, b = time.perf_counter(), busy()
if op == "put":
    s.put_file(path, key)
elif op == "publish":
    file_digest(path)
    s.put_file(path, key)
elif op == "get":
    s.get_file(key, path)
elif op in opened:
    if op == "copy_read":
        s.get_file(key, path)
    read_all(opened[op]())
else:
    file_digest(path, op.removeprefix("hash_"))
seconds = time.perf_counter() - t
cores = (busy() - b) / seconds
if op.startswith("hash_"):  # and the algorithm alone, on bytes in memory
    block, h = os.urandom(64 << 20), new_hasher(op.removeprefix("hash_"))
    m = time.perf_counter()
    for _ in range(16):
        h.update(block)
    out["memory_MBps"] = 16 * len(block) / 1e6 / (time.perf_counter() - m)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "busy_cores": cores, "peak_rss_mb": rss, **out}))
"""

TARGET = 0.10

# (kind, child op) of each round, and (line, baseline) of each reported line, per store
ROUND = {
    "file": [("plain", "read"), ("plain_again", "read"), ("stream_first", "read_stream"),
             ("verified_first", "read_verified"), ("verified_cached", "read_verified_cached")],
    "s3": [("plain", "read"), ("plain_again", "read"), ("plain_copy", "copy_read"), ("stream_first", "read_stream"),
           ("verified_first", "read_verified"), ("verified_cached", "read_verified_cached")],
}
LINES = {
    "file": [("plain_again", "plain"), ("stream_first", "plain"), ("verified_first", "plain"),
             ("verified_cached", "plain"), ("verified_first_published", "plain_warm")],
    "s3": [("plain_again", "plain"), ("stream_first", "plain"), ("verified_first", "plain_copy"),
           ("verified_cached", "plain_copy")],
}


def child(op: str, uri: str, key: str, path: Path | str, env: dict, digest: str = "", size: int = 0) -> dict:
    """Run ``op`` once in a fresh process; returns its seconds, busy cores and peak RSS."""
    out = subprocess.run([sys.executable, "-c", CHILD, op, uri, key, str(path), digest, str(size)],
                         capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2])
    if out.returncode:
        sys.exit(f"bench_store: {op} of {uri or path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_lines(store: str, uri: str, size: int, digest: str, env: dict, tmp: Path, repeats: int, gib: float,
               src: Path) -> list[dict]:
    """Every kind of read of ``big.bin`` (and, for the file store, of a copy of ``src`` published
    from here), once per round for ``repeats`` rounds, each round in the reverse order of the
    last; one line per verified read (and each store's control line)."""
    runs: dict[str, list[dict]] = defaultdict(list)

    def cache(kind: str, i: int) -> dict:  # a cache of its own for each read
        return {**env, "LOPD_CACHE": str(tmp / f"cache-{store}-{kind}-{i}")}

    for i in range(repeats):
        if store == "file":
            child("publish", uri, "published.bin", src, cache("published", i))
            pair = [("plain_warm", "warm_read"), ("verified_first_published", "warm_read_verified")]
            for kind, op in pair if i % 2 == 0 else pair[::-1]:
                runs[kind].append(child(op, uri, "published.bin", "", cache("published", i), digest, size))
            (Path(uri.removeprefix("file://")) / "published.bin").unlink()
        for kind, op in ROUND[store] if i % 2 == 0 else ROUND[store][::-1]:
            runs[kind].append(child(op, uri, "big.bin", tmp / "copy.bin", cache(kind, i), digest, size))
            (tmp / "copy.bin").unlink(missing_ok=True)
        for kind in (*dict(ROUND[store]), "published"):
            shutil.rmtree(tmp / f"cache-{store}-{kind}-{i}", ignore_errors=True)
    mb = size / 1e6
    lines = []
    for kind, base in LINES[store]:
        ratios = [r["seconds"] / b["seconds"] for r, b in zip(runs[kind], runs[base], strict=True)]
        t, t0 = statistics.median(r["seconds"] for r in runs[kind]), statistics.median(r["seconds"] for r in runs[base])
        over = statistics.median(ratios) - 1
        control = kind == "plain_again"
        lines.append({
            "bench": f"store_read_{store}_{gib:g}gib", "read": kind, "bytes": size, "rounds": repeats,
            "cold_page_cache": store == "file" and base == "plain", "baseline": base,
            "baseline_MBps": round(mb / t0, 1), ("again_MBps" if control else "verified_MBps"): round(mb / t, 1),
            "overhead_fraction": round(over, 3),
            "overhead_range": [round(min(ratios) - 1, 3), round(max(ratios) - 1, 3)],
            **({"control": "the same unverified read twice: the spread of identical reads"} if control else
               {"overhead_target": TARGET, "meets_target": over < TARGET}),
            "baseline_busy_cores": round(statistics.median(r["busy_cores"] for r in runs[base]), 2),
            "busy_cores": round(statistics.median(r["busy_cores"] for r in runs[kind]), 2),
            "cores": os.cpu_count(),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[kind]), 1),
        })
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=7, help="rounds of every read (each round reversed)")
    ap.add_argument("--stores", default="file,s3", help="which stores to measure (s3 needs SeaweedFS and boto3)")
    args = ap.parse_args()
    stores = args.stores.split(",")
    size = int(args.gib * (1 << 30)) >> 20 << 20  # whole MiB blocks
    with tempfile.TemporaryDirectory(prefix="lopd-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "files" / "big.bin"
        src.parent.mkdir()
        block = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for i in range(size >> 20):
                f.write(block[:-8] + i.to_bytes(8, "little"))
            f.flush()
            os.fsync(f.fileno())  # clean pages: a cold read can drop them (dirty ones stay cached)
        from lopd.store import file_digest

        digest = file_digest(src)
        rates = {}
        for algorithm in ("blake3", "sha256"):
            r = child(f"hash_{algorithm}", "", "", src, {"LOPD_CACHE": str(tmp / "cache-hash")})
            rates[f"{algorithm}_file_MBps"] = round(size / 1e6 / r["seconds"], 1)
            rates[f"{algorithm}_memory_MBps"] = round(r["memory_MBps"], 1)
        print(json.dumps({"bench": f"store_hash_{args.gib:g}gib", "bytes": size, **rates}), flush=True)
        if "file" in stores:
            for line in read_lines("file", f"file://{src.parent}", size, digest, {}, tmp, args.repeats, args.gib, src):
                print(json.dumps(line), flush=True)
        if "s3" not in stores:
            return
        from tests.helpers.seaweed import BUCKET, SeaweedServer

        with SeaweedServer(tmp / "weed") as server:
            env = server.env()
            uri = f"s3://{BUCKET}/bench"
            up = child("put", uri, "big.bin", src, env)
            down = child("get", uri, "big.bin", tmp / "back.bin", env)
            ok = digest == file_digest(tmp / "back.bin")
            (tmp / "back.bin").unlink()
            peak = max(up["peak_rss_mb"], down["peak_rss_mb"])
            print(json.dumps({
                "bench": f"store_s3_transfer_{args.gib:g}gib", "bytes": size,
                "upload_MBps": round(size / 1e6 / up["seconds"], 1),
                "download_MBps": round(size / 1e6 / down["seconds"], 1),
                "upload_peak_rss_mb": round(up["peak_rss_mb"], 1),
                "download_peak_rss_mb": round(down["peak_rss_mb"], 1),
                "peak_rss_target_mb": 300, "rss_ratio_to_target": round(peak / 300, 3),
                "roundtrip_digest_equal": ok, "meets_target": ok and peak < 300,
            }), flush=True)
            for line in read_lines("s3", uri, size, digest, env, tmp, args.repeats, args.gib, src):
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

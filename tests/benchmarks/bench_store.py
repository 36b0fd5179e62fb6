"""Store benchmark: upload and download through a real SeaweedFS S3 server, and what read-time
verification costs on the file store and on the S3 store.

Every measurement runs in a fresh child process that reports its time and peak RSS (target
< 300 MB: files stream, never held in memory). Reads are measured side by side on the same
object, interleaved and repeated (medians kept). Each verified read is set against the
unverified read a reader of the same kind would do instead (``baseline``):

- ``plain``: a sequential read of the object (``Store.open``), nothing verified;
- ``plain_copy``: an unverified local copy (``Store.get_file``: boto3's parallel download, a
  kernel copy for the file store), then read: what a reader that needs random access (parquet)
  does without verification on S3;
- ``stream_first``: ``Store.stream_verified``, the sequential verified read, bytes hashed on a
  second thread as the reader takes them and refused at the end (baseline ``plain``);
- ``verified_first``: ``Store.open_verified``, the seekable verified read, from an empty cache
  (S3: the object is copied into the digest-keyed cache and hashed on the way, then the copy is
  read, baseline ``plain_copy``; file store: one hashing pass of the file in place, then the
  read, baseline ``plain``);
- ``verified_cached``: ``Store.open_verified`` again (the copy's stat signature is unchanged, so
  it is not rehashed), then the copy is read;
- ``verified_first_published`` (file store only): the object was published from this machine
  first, as a stage does (``file_digest`` of the local file for the manifest, then
  ``Store.put_file``; not timed), so its signature is registered; then ``Store.open_verified``
  is timed in a fresh process as for ``verified_first``.

File-store reads start cold: each child drops the file's pages from the page cache
(``posix_fadvise(DONTNEED)``) before its timed read, plain and verified alike, because a file
this machine has never seen (the case that costs a hash) was written elsewhere and is not in
its page cache. The published file is the exception: its publisher just wrote it here, so it
and its baseline (``plain_warm``) are read warm. S3 clients connect before the clock starts.
``plain``, ``plain_warm`` and ``verified_cached`` run three times per process (median kept),
the others once.

The target: verification costs < 10% of the read time (``overhead_fraction`` = verified time /
baseline time - 1). ``*_busy_cores`` is how many of the machine's ``cores`` were busy during
the read (all processes, from ``/proc/stat``): a read that already keeps every core busy
leaves no room for a hashing thread to hide in. One JSON line per measurement, and one for the hash rates (BLAKE3, which
lopd writes, and sha256, which older manifests record).

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
import json, os, resource, sys, time
from lopd.store import file_digest, open_store
op, uri, key, path, digest, size, times = sys.argv[1:8]
cold = uri.startswith("file://") and op.startswith(("read", "copy_read"))
op = op.removeprefix("warm_")
s = open_store(uri)
if uri.startswith("s3://"):
    s.exists(key)  # the client and its connection exist before the clock starts
def busy():  # machine-wide busy CPU seconds (every process: the S3 server and the kernel too)
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
seconds, cores = [], []
for _ in range(int(times)):
    if cold:  # drop the file's pages: a file this machine has never seen is not in its page cache
        fd = os.open(os.path.join(uri[len("file://"):], key), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t, b = time.perf_counter(), busy()
    if op == "put":
        s.put_file(path, key)
    elif op == "publish":
        file_digest(path)
        s.put_file(path, key)
    elif op == "get":
        s.get_file(key, path)
    elif op in ("read", "read_verified", "read_stream", "copy_read"):
        if op == "copy_read":
            s.get_file(key, path)
        opened = {"read": lambda: s.open(key), "copy_read": lambda: open(path, "rb"),
                  "read_verified": lambda: s.open_verified(key, digest, int(size)),
                  "read_stream": lambda: s.stream_verified(key, digest, int(size))}[op]
        with opened() as f:
            n = 0
            while chunk := f.read(1 << 20):
                n += len(chunk)
        assert n == int(size), (n, size)
    else:
        file_digest(path, op.removeprefix("hash_"))
    seconds.append(time.perf_counter() - t)
    cores.append((busy() - b) / seconds[-1])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "busy_cores": cores, "peak_rss_mb": rss}))
"""

TARGET = 0.10


def child(op: str, uri: str, key: str, path: Path | str, env: dict, digest: str = "", size: int = 0,
          times: int = 1) -> dict:
    """Run ``op`` ``times`` times in a fresh process; ``seconds`` is the median of its runs."""
    out = subprocess.run([sys.executable, "-c", CHILD, op, uri, key, str(path), digest, str(size), str(times)],
                         capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2], check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {**res, "seconds": statistics.median(res["seconds"]), "busy_cores": statistics.median(res["busy_cores"])}


def read_lines(store: str, uri: str, size: int, digest: str, env: dict, tmp: Path, repeats: int, gib: float,
               src: Path) -> list[dict]:
    """Plain, first verified (sequential and seekable) and cached verified reads of ``big.bin``
    (and, for the file store, the first verified read of a copy of ``src`` published from here),
    interleaved ``repeats`` times."""
    runs: dict[str, list[dict]] = {"plain": [], "plain_warm": [], "plain_copy": [], "stream_first": [],
                                   "verified_first": [], "verified_cached": [], "verified_first_published": []}
    for i in range(repeats):
        if store == "file":
            published = {**env, "LOPD_CACHE": str(tmp / f"cache-{store}-published-{i}")}
            child("publish", uri, "published.bin", src, published)
            runs["verified_first_published"].append(
                child("warm_read_verified", uri, "published.bin", "", published, digest, size))
            runs["plain_warm"].append(child("warm_read", uri, "published.bin", "", env, digest, size, times=3))
            (Path(uri.removeprefix("file://")) / "published.bin").unlink()
            shutil.rmtree(tmp / f"cache-{store}-published-{i}", ignore_errors=True)
        cache = {**env, "LOPD_CACHE": str(tmp / f"cache-{store}-{i}")}
        runs["plain"].append(child("read", uri, "big.bin", "", env, digest, size, times=3))
        runs["plain_copy"].append(child("copy_read", uri, "big.bin", tmp / "copy.bin", env, digest, size))
        (tmp / "copy.bin").unlink()
        runs["stream_first"].append(child("read_stream", uri, "big.bin", "", cache, digest, size))
        runs["verified_first"].append(child("read_verified", uri, "big.bin", "", cache, digest, size))
        runs["verified_cached"].append(child("read_verified", uri, "big.bin", "", cache, digest, size, times=3))
        shutil.rmtree(tmp / f"cache-{store}-{i}", ignore_errors=True)
    mb = size / 1e6
    median = {kind: statistics.median(r["seconds"] for r in rs) for kind, rs in runs.items() if rs}
    lines = []
    for kind in ("stream_first", "verified_first", "verified_cached", "verified_first_published"):
        if kind not in median:
            continue
        # a seekable reader on S3 needs a local copy either way; everything else reads the store
        # directly; a file published from here is still in the page cache, so both reads start warm
        base = ("plain_copy" if store == "s3" and kind != "stream_first"
                else "plain_warm" if kind == "verified_first_published" else "plain")
        t, t0 = median[kind], median[base]
        lines.append({
            "bench": f"store_read_{store}_{gib:g}gib", "read": kind, "bytes": size, "repeats": repeats,
            "cold_page_cache": store == "file" and base == "plain", "baseline": base,
            "baseline_MBps": round(mb / t0, 1), "verified_MBps": round(mb / t, 1),
            "overhead_fraction": round(t / t0 - 1, 3), "overhead_target": TARGET,
            "meets_target": t / t0 - 1 < TARGET,
            "plain_MBps": round(mb / median["plain"], 1), "plain_copy_MBps": round(mb / median["plain_copy"], 1),
            "baseline_busy_cores": round(statistics.median(r["busy_cores"] for r in runs[base]), 2),
            "verified_busy_cores": round(statistics.median(r["busy_cores"] for r in runs[kind]), 2),
            "cores": os.cpu_count(),
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
        from lopd.store import file_digest

        digest = file_digest(src)
        rates = {f"{algorithm}_MBps": round(size / 1e6 / child(f"hash_{algorithm}", "", "", src, {})["seconds"], 1)
                 for algorithm in ("blake3", "sha256")}
        print(json.dumps({"bench": f"store_hash_{args.gib:g}gib", "bytes": size, **rates}), flush=True)
        for line in read_lines("file", f"file://{src.parent}", size, digest, {}, tmp, args.repeats, args.gib, src):
            print(json.dumps(line), flush=True)
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

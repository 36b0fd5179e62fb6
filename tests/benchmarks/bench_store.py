"""Store benchmark: a 2 GiB upload and download through a real SeaweedFS S3 server, and the cost
of read-time verification.

Each transfer runs in a fresh child process that reports its own peak RSS (target < 300 MB:
files stream, never held in memory) and throughput. Reads are measured side by side: a plain
sequential read (``Store.open``) and a verified one (``Store.open_verified``: one streamed pass
into the sha256 cache, hashed on the way, then the local copy read as a reader would), each from
a cold cache; the target is verification costing < 10% of the read time. Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_store.py [--gib 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.seaweed import BUCKET, SeaweedServer  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from lopd.store import open_store, sha256_file
op, uri, key, path, sha, size = sys.argv[1:7]
s = open_store(uri)
t = time.perf_counter()
if op == "put":
    s.put_file(path, key)
elif op == "get":
    s.get_file(key, path)
elif op == "read":
    with s.open(key) as f:
        while f.read(1 << 20):
            pass
elif op == "read_verified":
    with s.open_verified(key, sha, int(size)) as f:
        while f.read(1 << 20):
            pass
else:
    sha256_file(path)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(op: str, uri: str, key: str, path: Path, env: dict, sha: str = "", size: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, op, uri, key, str(path), sha, str(size)],
                         capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=2, help="plain and verified reads, each (best kept)")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(prefix="lopd-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "big.bin"
        block = os.urandom(1 << 20)
        with open(src, "wb") as f:
            for i in range(size >> 20):
                f.write(block[:-8] + i.to_bytes(8, "little"))
        with SeaweedServer(tmp / "weed") as server:
            env = server.env()
            uri = f"s3://{BUCKET}/bench"
            hashing = child("hash", uri, "", src, env)
            up = child("put", uri, "big.bin", src, env)
            down = child("get", uri, "big.bin", tmp / "back.bin", env)
            from lopd.store import sha256_file

            sha = sha256_file(src)
            ok = sha == sha256_file(tmp / "back.bin")
            (tmp / "back.bin").unlink()
            reads = {"read": [], "read_verified": []}
            for i in range(args.repeats):  # alternate, each verified read from a cold cache
                reads["read"].append(child("read", uri, "big.bin", src, env))
                cold = {**env, "LOPD_CACHE": str(tmp / f"cache-{i}")}
                reads["read_verified"].append(child("read_verified", uri, "big.bin", src, cold, sha, size))
                shutil.rmtree(tmp / f"cache-{i}", ignore_errors=True)
    mb = size / 1e6
    plain = min(r["seconds"] for r in reads["read"])
    verified = min(r["seconds"] for r in reads["read_verified"])
    peak = max(up["peak_rss_mb"], down["peak_rss_mb"], *(r["peak_rss_mb"] for r in reads["read_verified"]))
    print(json.dumps({
        "bench": f"store_s3_{args.gib:g}gib",
        "bytes": size,
        "upload_MBps": round(mb / up["seconds"], 1),
        "download_MBps": round(mb / down["seconds"], 1),
        "sha256_MBps": round(mb / hashing["seconds"], 1),
        "read_plain_MBps": round(mb / plain, 1),
        "read_verified_MBps": round(mb / verified, 1),
        "verified_to_plain_time_ratio": round(verified / plain, 3),
        "verification_overhead_target": 0.10,
        "verification_meets_target": verified / plain < 1.10,
        "upload_peak_rss_mb": round(up["peak_rss_mb"], 1),
        "download_peak_rss_mb": round(down["peak_rss_mb"], 1),
        "peak_rss_target_mb": 300,
        "rss_ratio_to_target": round(peak / 300, 3),
        "roundtrip_sha256_equal": ok,
        "meets_target": ok and peak < 300,
    }))


if __name__ == "__main__":
    main()

"""Store benchmark: a 2 GiB upload and download through a real SeaweedFS S3 server.

Each transfer runs in a fresh child process that reports its own peak RSS (target < 300 MB:
files stream, never held in memory) and throughput. Prints one JSON line.

    .venv/bin/python tests/benchmarks/bench_store.py [--gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.seaweed import BUCKET, SeaweedServer  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from lopd.store import open_store, sha256_file
op, uri, key, path = sys.argv[1:5]
s = open_store(uri)
t = time.perf_counter()
if op == "put":
    s.put_file(path, key)
elif op == "get":
    s.get_file(key, path)
else:
    sha256_file(path)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(op: str, uri: str, key: str, path: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, op, uri, key, str(path)], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
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

        ok = sha256_file(src) == sha256_file(tmp / "back.bin")
    mb = size / 1e6
    peak = max(up["peak_rss_mb"], down["peak_rss_mb"])
    print(json.dumps({
        "bench": "store_s3_2gib",
        "bytes": size,
        "upload_MBps": round(mb / up["seconds"], 1),
        "download_MBps": round(mb / down["seconds"], 1),
        "sha256_MBps": round(mb / hashing["seconds"], 1),
        "upload_peak_rss_mb": round(up["peak_rss_mb"], 1),
        "download_peak_rss_mb": round(down["peak_rss_mb"], 1),
        "peak_rss_target_mb": 300,
        "rss_ratio_to_target": round(peak / 300, 3),
        "roundtrip_sha256_equal": ok,
        "meets_target": ok and peak < 300,
    }))


if __name__ == "__main__":
    main()

"""Cost of storing the teacher's top-k (``precompute.teacher_topk``); prints one JSON line per part.

1. ``topk_parquet``: bytes per response token of a precompute parquet file (zstd, the stage's
   own writer) with top-k off and at ``--ks``, log-probs stored as float16 (the schema's choice)
   and, for comparison, float32. The rows are synthetic but shaped like a trained teacher's: a
   151,936-token vocabulary, Zipf-distributed token ids, a top-1 log-prob near 0 for most
   positions and the rest of the mass decaying over the ranks.
2. ``topk_scoring``: wall time of precompute's phase 2 (``jobs.precompute.score_part``: scoring,
   checks, building the columns) on the same rollouts with top-k off and at ``--ks``, per backend
   (transformers; vLLM unless ``--no-vllm``), median of ``--repeats``, with a tiny random Qwen3
   made by ``lopd init-model``; and the ratio of each to top-k off.

    python tests/benchmarks/bench_topk.py [--ks 8,20] [--sequences 32] [--repeats 3] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

VOCAB = 151_936


def synthetic_rows(rows: int, k_max: int, rng: np.random.Generator) -> dict[str, list]:
    """Precompute rows with the teacher's top-``k_max`` (ids, log-probs float32) per position."""
    zipf = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    zipf /= zipf.sum()
    perm = rng.permutation(VOCAB)
    decay = np.arange(2, k_max + 1) ** -1.5
    cols: dict[str, list] = {k: [] for k in ("prompt_id", "sample_index", "prompt_token_ids", "response_token_ids",
                                             "teacher_logprobs", "rollout_logprobs", "finish_reason", "answer",
                                             "ids", "lps")}
    for i in range(rows):
        p, r = int(rng.integers(40, 300)), int(np.clip(rng.lognormal(np.log(1500), 0.8), 32, 4096))
        resp = perm[rng.choice(VOCAB, r, p=zipf)].astype(np.int32)
        top1 = -rng.exponential(0.35, r)
        rest = (1 - np.exp(top1))[:, None] * decay / decay.sum() * rng.uniform(0.5, 0.95, (r, 1))
        lps = np.concatenate([top1[:, None], np.log(np.sort(rest, -1)[:, ::-1])], -1).astype(np.float32)
        ids = perm[rng.choice(VOCAB, (r, k_max), p=zipf)].astype(np.int32)
        ids[:, 0] = resp  # the sampled token is mostly the teacher's top-1
        for name, v in (("prompt_id", f"opd-{i:07d}"), ("sample_index", 0),
                        ("prompt_token_ids", perm[rng.choice(VOCAB, p, p=zipf)].astype(np.int32)),
                        ("response_token_ids", resp), ("teacher_logprobs", lps[:, 0]),
                        ("rollout_logprobs", (lps[:, 0] + rng.normal(0, 0.1, r)).clip(max=0).astype(np.float32)),
                        ("finish_reason", "stop"), ("answer", "42"), ("ids", ids), ("lps", lps)):
            cols[name].append(v)
    return cols


def bench_parquet(ks: list[int], rows: int, seed: int = 0) -> dict:
    import pyarrow as pa

    from lopd.data.schemas import precompute_schema, write_table

    cols = synthetic_rows(rows, max(ks), np.random.default_rng(seed))
    tokens = sum(len(r) for r in cols["response_token_ids"])
    out: dict = {"bench": "topk_parquet", "rows": rows, "response_tokens": tokens, "vocab": VOCAB}
    with tempfile.TemporaryDirectory() as d:
        def size(k: int, lp_type) -> float:
            schema = precompute_schema(k)
            data = {n: v for n, v in cols.items() if n not in ("ids", "lps")}
            if k:
                schema = schema.set(schema.get_field_index("teacher_topk_logprobs"),
                                    pa.field("teacher_topk_logprobs", pa.list_(lp_type)))
                data["teacher_topk_ids"] = [a[:, :k].reshape(-1) for a in cols["ids"]]
                data["teacher_topk_logprobs"] = [a[:, :k].reshape(-1).astype(lp_type.to_pandas_dtype())
                                                 for a in cols["lps"]]
            path = Path(d) / f"k{k}.parquet"
            write_table(pa.table({n: pa.array(v, type=schema.field(n).type) for n, v in data.items()}), path, schema)
            return path.stat().st_size / tokens

        base = size(0, None)
        out["bytes_per_token_off"] = round(base, 2)
        for k in ks:
            for name, typ in (("fp16", pa.float16()), ("fp32", pa.float32())):
                b = size(k, typ)
                out[f"bytes_per_token_k{k}_{name}"] = round(b, 2)
                out[f"ratio_k{k}_{name}"] = round(b / base, 2)
    return out


def bench_scoring(ks: list[int], n: int, repeats: int, backends: list[str]) -> dict:
    import pyarrow as pa

    from jobs.precompute import ROLLOUTS, score_part
    from lopd.inference import load_backend
    from lopd.modelinit import init_model
    from lopd.parts import Lazy
    from lopd.recipe import InferenceConfig
    from tests.helpers.cli import write_corpus

    rng = np.random.default_rng(0)
    out: dict = {"bench": "topk_scoring", "sequences": n, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        model = init_model(Path(tmp) / "m", size="tiny", corpus=write_corpus(Path(tmp) / "corpus.txt"),
                           vocab_size=2048, max_position_embeddings=1024)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        lens = [(int(rng.integers(16, 64)), int(np.clip(rng.lognormal(np.log(300), 0.6), 16, 900))) for _ in range(n)]
        rows = {name: [] for name in ROLLOUTS.names}
        for i, (p, r) in enumerate(lens):
            for name, v in (("prompt_id", f"p{i}"), ("sample_index", 0),
                            ("prompt_token_ids", rng.integers(3, vocab, p).tolist()),
                            ("response_token_ids", rng.integers(3, vocab, r).tolist()),
                            ("rollout_logprobs", [-1.0] * r), ("finish_reason", "stop"), ("answer", None)):
                rows[name].append(v)
        table = pa.table(rows, schema=ROLLOUTS)
        out["response_tokens"] = sum(r for _, r in lens)
        for backend in backends:
            cfg = InferenceConfig(backend=backend, max_model_len=1024, max_num_seqs=32, gpu_memory_utilization=0.05)
            engine = Lazy(lambda cfg=cfg: load_backend(model, cfg, dtype="float32"))
            score_part(table.slice(0, 2), engine, "warm-up", max(ks))
            times = {}
            for k in [0, *ks]:
                t = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    score_part(table, engine, "bench", k)
                    t.append(time.perf_counter() - t0)
                times[k] = statistics.median(t)
            engine.close()
            out[f"{backend}_s_off"] = round(times[0], 3)
            for k in ks:
                out[f"{backend}_s_k{k}"] = round(times[k], 3)
                out[f"{backend}_ratio_k{k}"] = round(times[k] / times[0], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="8,20")
    ap.add_argument("--rows", type=int, default=200, help="rows of the parquet measurement")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    print(json.dumps(bench_parquet(ks, args.rows)), flush=True)
    print(json.dumps(bench_scoring(ks, args.sequences, args.repeats, ["hf"] + ([] if args.no_vllm else ["vllm"]))),
          flush=True)


if __name__ == "__main__":
    main()

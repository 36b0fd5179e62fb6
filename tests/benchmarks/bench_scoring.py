"""Benchmark of teacher scoring and of the precompute output; prints ONE JSON line.

1. ``scoring``: tokens/s of scoring the same sequences (a realistic spread of lengths: log-normal
   responses after a short prompt) through the vLLM backend (prompt log-probs) and through a
   padded, unchunked transformers forward (``log_softmax(model(batch).logits)``, the usual
   baseline), side by side in one process; medians of ``--repeats`` runs. Target ratio >= 2.
2. ``memory``: peak extra memory of the lm-head + log-softmax step of scoring one 4k-token
   sequence with a 151,936-token vocabulary: full fp32 logits vs
   :func:`lopd.inference.hf_backend.chunked_token_logprobs` (chunk 1024), each measured in a
   fresh subprocess as the rise of peak RSS (CPU) or ``max_memory_allocated`` (GPU), median of 3.
   Target <= 25%.
3. ``parquet``: bytes per response token of a precompute parquet file (schema PRECOMPUTE, zstd)
   holding realistic rows (151k-vocabulary Zipf token ids, log-probs with the heavy mass near 0
   of a trained model), vs the raw int32 id + 2 float32 log-probs (12 bytes). Target <= 1.1x.

    python tests/benchmarks/bench_scoring.py [--model DIR] [--sequences 48] [--repeats 3]

Without ``--model`` a random ``small`` Qwen3 is made with ``lopd init-model`` (CPU-sized). On a
GPU pass a real teacher directory; MFU is then reported from 2·params FLOPs per token against
``--peak-tflops`` (H100 SXM bf16 dense: 989).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# vLLM's own engine layout (engine core in its own process), not lopd's CPU start-up shortcut
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

VOCAB_151K = 151_936


def lengths(n: int, rng: np.random.Generator, max_len: int) -> list[tuple[int, int]]:
    """(prompt, response) lengths: prompts 32-160, responses log-normal (median ~300), capped."""
    out = []
    for _ in range(n):
        p = int(rng.integers(32, 160))
        r = int(np.clip(rng.lognormal(np.log(300), 0.7), 16, max_len - p - 1))
        out.append((p, r))
    return out


def hf_padded_unchunked(model, prompts, responses, batch: int, device) -> list[np.ndarray]:
    """The baseline: right-padded batches, full logits, full log_softmax."""
    import torch

    out = []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch):
            ps, rs = prompts[lo:lo + batch], responses[lo:lo + batch]
            seqs = [p + r for p, r in zip(ps, rs, strict=True)]
            width = max(map(len, seqs))
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(),
                                     -1)
            for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
                tgt = torch.tensor(r, device=device)
                out.append(logp[i, len(p) - 1:len(p) - 1 + len(r)].gather(-1, tgt[:, None])[:, 0].cpu().numpy())
            del logp
    return out


def bench_scoring(model_dir: Path, n: int, repeats: int, batch: int, peak_tflops: float | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.inference import load_backend
    from lopd.recipe import InferenceConfig

    cfg = json.loads((model_dir / "config.json").read_text())
    max_len = min(2048, cfg["max_position_embeddings"])
    rng = np.random.default_rng(0)
    vocab = cfg["vocab_size"]
    lens = lengths(n, rng, max_len)
    prompts = [rng.integers(3, vocab, p).tolist() for p, _ in lens]
    responses = [rng.integers(3, vocab, r).tolist() for _, r in lens]
    tokens = sum(r for _, r in lens)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    vllm = load_backend(model_dir, InferenceConfig(backend="vllm", max_model_len=max_len, max_num_seqs=64,
                                                   gpu_memory_utilization=0.6 if gpu else 0.05),
                        dtype="bfloat16" if gpu else "float32")
    vllm.score(prompts[:2], responses[:2])  # warm-up
    t_v = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got_v = vllm.score(prompts, responses)
        t_v.append(time.perf_counter() - t0)
    vllm.close()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    hf_padded_unchunked(hf, prompts[:2], responses[:2], batch, device)
    t_h = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got_h = hf_padded_unchunked(hf, prompts, responses, batch, device)
        if gpu:
            torch.cuda.synchronize()
        t_h.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in hf.parameters())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got_v, got_h, strict=True))
    out = {"model_params": params, "vocab": vocab, "sequences": n, "response_tokens": tokens,
           "seq_len_min": min(p + r for p, r in lens), "seq_len_median": int(np.median([p + r for p, r in lens])),
           "seq_len_max": max(p + r for p, r in lens), "hf_batch": batch,
           "vllm_tokens_per_s": round(tokens / statistics.median(t_v), 1),
           "hf_padded_tokens_per_s": round(tokens / statistics.median(t_h), 1),
           "max_abs_logprob_diff": diff, "device": "cuda" if gpu else "cpu"}
    out["speedup"] = round(out["vllm_tokens_per_s"] / out["hf_padded_tokens_per_s"], 2)
    if gpu and peak_tflops:
        all_tokens = sum(p + r for p, r in lens)
        out["vllm_mfu"] = round(2 * params * all_tokens / statistics.median(t_v) / (peak_tflops * 1e12), 3)
    return out


MEM_CHILD = r"""
import json, resource, sys, torch
from lopd.inference.hf_backend import chunked_token_logprobs
mode, T, V, H, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
gpu = torch.cuda.is_available()
dev = "cuda" if gpu else "cpu"
torch.manual_seed(0)
hidden = torch.randn(T, H, device=dev)
head = torch.nn.Linear(H, V, bias=False, device=dev)
tgt = torch.randint(0, V, (T,), device=dev)
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def run(h, t):
    if mode == "full":
        return torch.log_softmax(head(h).float(), -1).gather(-1, t[:, None])[:, 0]
    return chunked_token_logprobs(h, head, t, chunk)
with torch.inference_mode():
    run(hidden[:8], tgt[:8])  # warm-up: touch the kernels' code pages before the baseline
    if gpu:
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = rss_kb() * 1024
    out = run(hidden, tgt)
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_extra_bytes": peak - base, "checksum": float(out.sum())}))
"""


def bench_memory(T: int = 4096, V: int = VOCAB_151K, H: int = 64, chunk: int = 1024, repeats: int = 3) -> dict:
    res: dict[str, list[dict]] = {"full": [], "chunked": []}
    for _ in range(repeats):
        for mode in ("full", "chunked"):
            proc = subprocess.run([sys.executable, "-c", MEM_CHILD, mode, str(T), str(V), str(H), str(chunk)],
                                  capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO),
                                                                                 "PATH": "/usr/bin:/bin"})
            if proc.returncode:
                raise RuntimeError(proc.stderr)
            res[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, b = res["full"][0]["checksum"], res["chunked"][0]["checksum"]
    assert abs(a - b) < 1e-4 * abs(a), (a, b)
    full = statistics.median(r["peak_extra_bytes"] for r in res["full"])
    ch = statistics.median(r["peak_extra_bytes"] for r in res["chunked"])
    return {"tokens": T, "vocab": V, "chunk": chunk, "full_logits_peak_mib": round(full / 2**20, 1),
            "chunked_peak_mib": round(ch / 2**20, 1), "ratio": round(ch / full, 3)}


def bench_parquet(rows: int = 400, seed: int = 0) -> dict:
    import pyarrow as pa

    from lopd.data.schemas import PRECOMPUTE, write_table

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB_151K + 1)
    zipf = 1.0 / ranks ** 1.1
    zipf /= zipf.sum()
    perm = rng.permutation(VOCAB_151K)
    cols: dict[str, list] = {k: [] for k in PRECOMPUTE.names}
    resp_tokens = 0
    for i in range(rows):
        p = int(rng.integers(40, 300))
        r = int(np.clip(rng.lognormal(np.log(1500), 0.8), 32, 4096))
        resp_tokens += r
        cols["prompt_id"].append(f"opd-{i:07d}")
        cols["sample_index"].append(0)
        cols["prompt_token_ids"].append(perm[rng.choice(VOCAB_151K, p, p=zipf)].astype(np.int32))
        cols["response_token_ids"].append(perm[rng.choice(VOCAB_151K, r, p=zipf)].astype(np.int32))
        # trained models: most tokens near-certain, a heavy tail of uncertain ones
        student = -rng.exponential(0.35, r).astype(np.float32)
        cols["rollout_logprobs"].append(student)
        cols["teacher_logprobs"].append((student - rng.exponential(0.2, r)).astype(np.float32))
        cols["finish_reason"].append("stop")
        cols["answer"].append(str(int(rng.integers(0, 1000))))
    table = pa.table(cols, schema=PRECOMPUTE)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "part.parquet"
        write_table(table, path, PRECOMPUTE)
        size = path.stat().st_size
    per_tok = size / resp_tokens
    return {"rows": rows, "response_tokens": resp_tokens, "file_bytes": size,
            "bytes_per_response_token": round(per_tok, 2), "raw_bytes_per_token": 12,
            "ratio_to_raw": round(per_tok / 12, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="teacher model dir (default: make a small one)")
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="transformers baseline batch size")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--skip-scoring", action="store_true")
    args = ap.parse_args()
    out: dict = {"bench": "scoring"}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_scoring:
            model = args.model
            if model is None:
                from lopd.modelinit import init_model
                from tests.helpers.cli import write_corpus

                corpus = write_corpus(Path(tmp) / "corpus.txt")
                model = init_model(Path(tmp) / "m", size="base", corpus=corpus, vocab_size=2048,
                                   max_position_embeddings=2048)
            out["scoring"] = bench_scoring(model, args.sequences, args.repeats, args.batch, args.peak_tflops)
        out["memory"] = bench_memory()
        out["parquet"] = bench_parquet()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

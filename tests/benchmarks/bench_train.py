"""Training benchmarks, measured side by side in one run; prints ONE JSON line (medians).

1. SFT tokens/s, packed vs padded micro-batches under the same token budget, on a long-tailed
   (log-normal) length spread: forward + backward of the assistant-token loss.
2. Peak memory of chunked vs naive (full [T, V] fp32 logits) log-probs with a 151,936-token
   vocabulary (Qwen3's), forward + backward; each variant in its own subprocess, peak RSS
   above the inputs' baseline (or CUDA peak allocation on a GPU).
3. One OPD step, offline (precomputed rollouts) vs online (push weights + sample + teacher
   scoring + the same update) at the same batch size, through DeepSpeed (1 rank).

    python tests/benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VOCAB_151K = 151_936


def make_models(tmp: Path) -> tuple[Path, Path]:
    from lopd.modelinit import init_model
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp / "corpus.txt")
    student = init_model(tmp / "student", size="small", corpus=corpus, vocab_size=512, seed=1)
    teacher = init_model(tmp / "teacher", size="small", tokenizer=student, seed=2)
    return student, teacher


# --------------------------------------------------------------------------- 1. packing


def bench_packing(model_dir: Path, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lopd.train import losses as L
    from lopd.train.packing import Seq, pack, pad

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(160), 0.8, 48).astype(int), 16, 1024)
    seqs = []
    for i, n in enumerate(lens):
        labels = np.zeros(n, bool)
        labels[n // 3:] = True  # last two thirds: the "assistant" tokens
        seqs.append(Seq(rng.integers(3, 500, n).astype(np.int64), labels, i))
    budget = 2048

    def run(mbs) -> float:
        t0 = time.perf_counter()
        for mb in mbs:
            lp, _ = L.model_logprobs(model, mb.input_ids, mb.position_ids, mb.targets, mb.select, mb.attention_mask)
            L.aggregate(-lp, L.token_weights(torch.ones_like(lp), mb.seq_index)).backward()
        model.zero_grad(set_to_none=True)
        return int(lens.sum()) / (time.perf_counter() - t0)

    packed, padded = pack(seqs, budget), pad(seqs, budget)
    tp = [run(packed) for _ in range(repeats)]
    td = [run(padded) for _ in range(repeats)]
    pad_frac = 1 - int(lens.sum()) / sum(mb.input_ids.numel() for mb in padded)
    return {"sft_packed_tokens_per_s": statistics.median(tp), "sft_padded_tokens_per_s": statistics.median(td),
            "sft_packed_vs_padded": statistics.median(tp) / statistics.median(td),
            "sft_padding_fraction": pad_frac, "sft_lengths": [int(lens.min()), int(np.median(lens)), int(lens.max())],
            "sft_micro_batches_packed": len(packed), "sft_micro_batches_padded": len(padded)}


# --------------------------------------------------------------------------- 2. memory


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(kind: str, tokens: int, hidden: int, chunk: int) -> None:
    """Run one log-prob variant (forward + backward) and print its peak extra memory in MiB."""
    from lopd.train import losses as L

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h = (torch.randn(tokens, hidden, device=dev) * 0.1).requires_grad_(True)
    w = (torch.randn(VOCAB_151K, hidden, device=dev) * 0.02).requires_grad_(True)
    t = torch.randint(0, VOCAB_151K, (tokens,), device=dev)
    _ = (h.sum() + w.sum()).backward()  # allocate the parameter gradients up front
    h.grad = w.grad = None
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    if kind == "naive":
        lp = L.gather_logprobs(h @ w.t(), t)
    else:
        lp, _ = L.chunked_logprobs(h, w, t, chunk)
    lp.sum().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mib() - base
    print(json.dumps({"peak_mib": peak}))


def bench_memory(tokens: int, hidden: int, chunk: int) -> dict:
    out = {}
    for kind in ("naive", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(tokens), str(hidden), str(chunk)],
                              capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return {"logprob_tokens": tokens, "logprob_vocab": VOCAB_151K, "logprob_chunk": chunk,
            "logprob_naive_peak_mib": out["naive"], "logprob_chunked_peak_mib": out["chunked"],
            "logprob_chunked_vs_naive_memory": out["chunked"] / out["naive"]}


# --------------------------------------------------------------------------- 3. OPD step


class _Run:
    def __init__(self, engine, section):
        self.engine, self.section, self.rank, self.world = engine, section, 0, 1


def bench_opd_step(student: Path, teacher: Path, steps: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.data.chat import encode_prompt
    from lopd.inference import load_backend
    from lopd.recipe import OpdConfig
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.online import InProcessTeacher, OnlineSource
    from lopd.train.opd import opd_step

    init_distributed()
    cfg = OpdConfig(train={"zero_stage": 0, "gradient_checkpointing": False, "micro_batch_tokens": 4096,
                           "global_batch": batch},
                    online={"sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 96},
                            "inference": {"backend": "hf", "max_num_seqs": batch}})
    engine = build_engine(AutoModelForCausalLM.from_pretrained(student), cfg.train, cfg.optim)
    src = OnlineSource(_Run(engine, cfg), None, None, [], {}, {})
    src.tokenizer = AutoTokenizer.from_pretrained(student)
    src.sampler = load_backend(student, cfg.online.inference)
    src.teacher = InProcessTeacher(teacher)
    ids = [encode_prompt(src.tokenizer, [{"role": "user", "content": f"Compute {i}+{i + 3}+{2 * i}."}])
           for i in range(batch)]
    keys = [f"q{i}" for i in range(batch)]
    offline_batch = src.rollouts(keys, ids, step=0)  # "precomputed" once
    t_off, t_on, phases = [], [], []
    for s in range(steps):
        t0 = time.perf_counter()
        opd_step(engine, [offline_batch], cfg, 1e-5, 1)
        t_off.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fresh = src.rollouts(keys, ids, step=s + 1)
        opd_step(engine, [fresh], cfg, 1e-5, 1)
        t_on.append(time.perf_counter() - t0)
        phases.append(src.timings)
    src.close()
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return {"opd_batch": batch, "opd_offline_step_s": statistics.median(t_off),
            "opd_online_step_s": statistics.median(t_on),
            "opd_online_vs_offline_time": statistics.median(t_on) / statistics.median(t_off),
            "opd_online_phases_s": med,
            "opd_response_tokens": int(sum(len(s.response_ids) for s in offline_batch))}


def main() -> None:
    import contextlib

    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # library chatter
        os.environ.setdefault("LOPD_CACHE", str(Path(tmp) / "cache"))
        student, teacher = make_models(Path(tmp))
        result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
        result.update(bench_packing(student, 2 if quick else 3))
        result.update(bench_memory(1024 if quick else 2048, 256, 256))
        result.update(bench_opd_step(student, teacher, 2 if quick else 3, 8 if quick else 16))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

"""Training benchmarks, measured side by side in one run; prints ONE JSON line (medians).

1. SFT tokens/s, packed vs padded micro-batches under the same token budget, on a long-tailed
   (log-normal) length spread: forward + backward of the assistant-token loss. Packed is the
   training layout (first-fit-decreasing rows of bounded width); a layout of one packed row per
   micro-batch is timed alongside for reference.
2. Peak memory of chunked vs naive (full [T, V] fp32 logits) log-probs with a 151,936-token
   vocabulary (Qwen3's), forward + backward; each variant in its own subprocess, peak RSS
   above the inputs' baseline (or CUDA peak allocation on a GPU).
3. One OPD step, offline (precomputed rollouts) vs online (push weights + sample + teacher
   scoring + the same update) at the same batch size, through DeepSpeed (1 rank).
4. One offline OPD step (one PPO mini-batch) through DeepSpeed on a random Qwen3 with a 32k
   vocabulary, four variants timed interleaved: with / without the no-grad ``log p_old`` pass
   (redundant with one mini-batch) x fused / unfused LM-head log-probs. Printed as two extra
   JSON lines, one per comparison (``"bench": "opd_old_logprob_pass"`` and ``"lm_head_fused"``).

    python tests/benchmarks/bench_train.py [--quick] [--only packing,memory,opd,opd_variants] [--threads N]

On a shared machine ``--threads 1`` is the stable measurement: OpenMP threads spin-wait on
oversubscribed cores, and the slow-down hits the variants unevenly.
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
    from tests.helpers.cli import write_corpus

    corpus = write_corpus(tmp / "corpus.txt")
    student = init_model(tmp / "student", size="small", corpus=corpus, vocab_size=512, seed=1)
    teacher = init_model(tmp / "teacher", size="small", tokenizer=student, seed=2)
    return student, teacher


# --------------------------------------------------------------------------- 1. packing


def bench_packing(model_dir: Path, repeats: int) -> dict:
    """Forward + backward of the token-mean assistant loss over 48 sequences, log-normal lengths
    (median 160, sigma 0.8, clipped to [16, 1024]), 2048-token micro-batches. Variants, timed
    interleaved (a shared machine's load hits all alike): the training layout (first-fit
    decreasing rows of bounded width), padded rows in data order (the baseline), and for
    reference one packed row per micro-batch (dense ``budget^2`` mask)."""
    from transformers import AutoModelForCausalLM

    from lopd.train import losses as L
    from lopd.train.packing import Seq, _packed, group_by_budget, make_micro_batches

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(160), 0.8, 48).astype(int), 16, 1024)
    seqs = []
    for i, n in enumerate(lens):
        labels = np.zeros(n, bool)
        labels[n // 3:] = True  # last two thirds: the "assistant" tokens
        seqs.append(Seq(rng.integers(3, model.config.vocab_size, n).astype(np.int64), labels, i))
    budget = 2048

    def run(mbs) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for mb in mbs:
            lp, _ = L.model_logprobs(model, mb.input_ids, mb.position_ids, mb.targets, mb.select, mb.attention_mask)
            L.aggregate(-lp, L.token_weights(torch.ones_like(lp), mb.seq_index)).backward()
        model.zero_grad(set_to_none=True)
        return int(lens.sum()) / (time.perf_counter() - t0), int(lens.sum()) / (time.process_time() - c0)

    variants = {"packed": make_micro_batches(seqs, budget, packing=True),
                "padded": make_micro_batches(seqs, budget, packing=False),
                "one_row": [_packed(seqs, [g]) for g in group_by_budget([len(s) for s in seqs], budget)]}
    assert variants["padded"][0].attention_mask is not None and variants["packed"][0].attention_mask is None
    run(variants["packed"])  # warm-up (allocator, thread pool)
    tps: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(repeats):
        for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            tps[k].append(run(variants[k]))
    med = {k: statistics.median(w for w, _ in v) for k, v in tps.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in tps.items()}
    area = {k: sum(mb.input_ids.numel() for mb in v) for k, v in variants.items()}
    attn = {k: sum(mb.input_ids.shape[0] * mb.input_ids.shape[1] ** 2 for mb in v) for k, v in variants.items()}
    return {"sft_packed_tokens_per_s": med["packed"], "sft_padded_tokens_per_s": med["padded"],
            "sft_packed_vs_padded": med["packed"] / med["padded"],
            "sft_packed_vs_padded_cpu_time": cpu["packed"] / cpu["padded"],  # robust to other processes at 1 thread
            "sft_packed_one_row_tokens_per_s": med["one_row"],
            "sft_packed_one_row_vs_padded": med["one_row"] / med["padded"],
            "sft_padding_fraction": 1 - int(lens.sum()) / area["padded"],
            "sft_packed_filler_fraction": 1 - int(lens.sum()) / area["packed"],
            "sft_attention_area_vs_ideal": {k: v / float((lens.astype(float) ** 2).sum()) for k, v in attn.items()},
            "sft_lengths": [int(lens.min()), int(np.median(lens)), int(lens.max())], "sft_tokens": int(lens.sum()),
            "sft_micro_batches": {k: len(v) for k, v in variants.items()}, "sft_repeats": repeats}


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


# --------------------------------------------------------------------------- 4. OPD step variants

VARIANT_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, intermediate_size=384, vocab_size=32768, tie_word_embeddings=True)


def bench_opd_variants(steps: int, batch: int, response_len: int) -> list[dict]:
    """Median step time of :func:`lopd.train.opd.opd_step` (1 rank, ZeRO-0, fp32 on CPU), variants
    timed round-robin on the same engine and rollouts: ``old_pass`` True/False x LM head fused /
    unfused (``engine.module.fused_head``). The default since these changes is (no pass, fused);
    before them it was (pass, unfused)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lopd.recipe import OpdConfig
    from lopd.train.data import OpdSample
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.opd import opd_step

    init_distributed()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**VARIANT_SHAPE)).float()
    cfg = OpdConfig(train={"zero_stage": 0, "gradient_checkpointing": False, "micro_batch_tokens": 2048,
                           "global_batch": batch})
    engine = build_engine(model, cfg.train, cfg.optim, chunk_size=1024)
    rng = np.random.default_rng(0)
    vocab = VARIANT_SHAPE["vocab_size"]
    samples = [OpdSample(f"p{i}", 0, rng.integers(3, vocab, 64), rng.integers(3, vocab, response_len),
                         *(rng.standard_normal((2, response_len)) - 3.0).astype(np.float32)) for i in range(batch)]
    variants = [(p, f) for p in (False, True) for f in (True, False)]  # (old_pass, fused)
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    metrics = {}
    for r in range(steps + 1):  # round 0: warm-up
        for v in (variants if r % 2 == 0 else variants[::-1]):
            engine.module.fused_head = v[1]
            t0 = time.perf_counter()
            metrics[v] = opd_step(engine, [samples], cfg, 0.0, 1, old_pass=v[0])  # lr 0: the same work every step
            if r:
                times[v].append(time.perf_counter() - t0)
    engine.module.fused_head = True
    med = {v: statistics.median(t) for v, t in times.items()}
    common = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
              "shape": VARIANT_SHAPE, "batch": batch, "response_tokens": int(metrics[variants[0]]["response_tokens"]),
              "repeats": steps}
    drift = max(abs(metrics[v]["loss"] - metrics[variants[0]]["loss"]) for v in variants)
    return [
        {"bench": "opd_old_logprob_pass", **common,
         "step_s_with_pass": med[(True, True)], "step_s_without_pass": med[(False, True)],
         "with_vs_without_pass": med[(True, True)] / med[(False, True)],
         "with_vs_without_pass_unfused_head": med[(True, False)] / med[(False, False)],
         "max_abs_loss_diff_between_variants": drift},
        {"bench": "lm_head_fused", **common,
         "step_s_unfused": med[(False, False)], "step_s_fused": med[(False, True)],
         "unfused_vs_fused": med[(False, False)] / med[(False, True)],
         "unfused_vs_fused_with_pass": med[(True, False)] / med[(True, True)],
         "old_default_vs_new_default": med[(True, False)] / med[(False, True)]},
    ]


def main() -> None:
    import contextlib

    quick = "--quick" in sys.argv
    every = ["packing", "memory", "opd", "opd_variants"]
    parts = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else every
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # library chatter
        os.environ.setdefault("LOPD_CACHE", str(Path(tmp) / "cache"))
        student, teacher = make_models(Path(tmp))
        result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads()}
        if "packing" in parts:
            result.update(bench_packing(student, 3 if quick else 5))
        if "memory" in parts:
            result.update(bench_memory(1024 if quick else 2048, 256, 256))
        if "opd" in parts:
            result.update(bench_opd_step(student, teacher, 2 if quick else 3, 8 if quick else 16))
        extra = bench_opd_variants(3 if quick else 5, 8 if quick else 16, 192) if "opd_variants" in parts else []
    print(json.dumps(result), flush=True)
    for line in extra:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

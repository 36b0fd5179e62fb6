"""The GPU training path, checked and timed: bf16, DeepSpeed on NCCL, SFT and OPD step throughput / MFU.

Runs lopd's own training code (``lopd.train.engine.build_engine`` → DeepSpeed, ``sft_step``,
``opd_step`` with packed micro-batches and the chunked LM head) on a random-initialised Qwen3 of a
real shape (no download), one process = one rank (each variant in its own process), and prints ONE
JSON line:

- ``matmul_tflops``: an 8192³ bf16 matrix product (the card's practical ceiling);
- ``parity``: per-token log-probs of the bf16 engine vs an fp32 copy of the same weights
  (mean / max |diff|), the all-reduce backend, and the OPD identity on the GPU (teacher = the
  student's own log-probs → advantage and gradient exactly 0);
- per variant (``sft``, ``opd`` at ``--zero``, ``opd-z3``; ``kind: train``): median step time,
  tokens/s and MFU over ``--steps`` timed steps after one warm-up. MFU = model FLOPs / step time /
  peak, model FLOPs per token = 6·P + 12·L·H·d·ctx for a training pass (P = parameters in
  matmuls, LM head included; ctx = mean causal context of the packed sequences; OPD with one PPO
  mini-batch makes no separate ``log p_old`` pass); peak = 989 TFLOP/s dense bf16 (H100/H200 SXM);
  the decoder layers as ``--grad-ckpt`` (off / full / selective) and ``--compile`` say, gradients
  added up in fp32 unless ``--bf16-accum`` (the recipe's ``train`` switches);
- ``score`` (``kind: score``): teacher scoring with the torch scorer over packed batches of
  ``--score-tokens``, MFU at one forward per token (2·P + 4·L·H·d·ctx).

    python tests/benchmarks/bench_gpu_step.py [--shape qwen3-1.7b] [--steps 5] [--zero 2]
    python tests/benchmarks/bench_gpu_step.py --shape tiny --steps 2      # CPU smoke run (gloo, fp32)
    python tests/benchmarks/bench_gpu_step.py --only sft,opd --attn varlen --grad-ckpt selective
    make gpu-check                                                         # the whole prepared check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lopd.flops import PEAK_BF16, SHAPES, flops_per_token, matmul_params  # noqa: E402

DENSE = [name for name, shape in SHAPES.items() if not shape.get("num_experts")]
"""The shapes this benchmark builds (dense Qwen3)."""
CKPT = {"off": False, "full": True, "selective": "selective"}
"""``--grad-ckpt`` → ``train.gradient_checkpointing``."""
COMPILE = {"off": False, "inductor": "inductor", "aot_eager": "aot_eager"}
"""``--compile`` → ``train.compile``."""


def matmul_tflops(n: int = 8192, reps: int = 10) -> float | None:
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def make_model(shape: str, attn: str, seed: int = 0):
    """Random weights, made on the training device (a 1.7B model initialises in seconds there)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lopd.train.engine import device, train_dtype

    torch.manual_seed(seed)
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=32768,
                      attn_implementation="sdpa" if attn == "varlen" else attn)
    with device():
        model = AutoModelForCausalLM.from_config(cfg, dtype=train_dtype())
    if attn == "varlen":  # lopd's flat varlen attention (train.attention: varlen)
        from lopd.train.varlen import set_attention

        set_attention(model, "varlen")
    return model


def lengths(n: int, median: int, cap: int, rng: np.random.Generator) -> list[int]:
    return [int(x) for x in np.clip(rng.lognormal(np.log(median), 0.6, n), 32, cap)]


def prompt_len(total: int) -> int:
    """Prompt tokens of a synthetic sequence of ``total`` tokens (the rest is the scored response)."""
    return min(128, total // 4)


def opd_samples(n: int, median: int, cap: int, vocab: int, rng: np.random.Generator):
    from lopd.train.data import OpdSample

    out = []
    for i, total in enumerate(lengths(n, median, cap, rng)):
        p = prompt_len(total)
        r = total - p
        out.append(OpdSample(f"p{i}", 0, rng.integers(0, vocab, p), rng.integers(0, vocab, r),
                             -rng.exponential(1.0, r).astype(np.float32), -rng.exponential(1.0, r).astype(np.float32)))
    return out


def mean_ctx(lens: list[int]) -> float:
    return sum(n * (n + 1) / 2 for n in lens) / sum(lens)


def timed(fn, steps: int) -> list[float]:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def profile(step, out: Path) -> None:
    """One more step under torch.profiler: the top operators by device and by host time, to ``out``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=acts) as p:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    avg = p.key_averages()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(avg.table(sort_by=sort, row_limit=30) + "\n" + avg.table(sort_by="cpu_time_total", row_limit=30))


def run_variant(name: str, args, world: int) -> dict:
    from lopd.opd_config import ImportanceWeightsConfig, OpdConfig
    from lopd.train.engine import build_engine
    from lopd.train.opd import opd_step, split_minis
    from lopd.train.packing import Seq
    from lopd.train.sft import sft_step
    from lopd.train_config import OptimConfig, SftConfig, TrainConfig

    zero = 3 if name == "opd-z3" else args.zero
    train = TrainConfig(steps=100, global_batch=args.batch, micro_batch_tokens=args.micro_batch_tokens,
                        max_seq_len=args.max_len, zero_stage=zero, gradient_checkpointing=CKPT[args.grad_ckpt],
                        compile=COMPILE[args.compile] if zero < 3 else False,  # the recipe refuses it at ZeRO-3
                        grad_accum_fp32=args.fp32_accum,
                        attention="varlen" if args.attn == "varlen" else "sdpa")
    optim = OptimConfig(lr=1e-6)
    engine = build_engine(make_model(args.shape, args.attn), train, optim, chunk_size=1024)
    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    if name == "sft":
        cfg = SftConfig(train=train, optim=optim)
        seqs = []
        for total in lengths(args.batch, args.median_len, args.max_len, rng):
            labels = np.zeros(total, bool)
            labels[prompt_len(total):] = True
            seqs.append(Seq(rng.integers(0, vocab, total), labels))
        lens = [len(s) for s in seqs]
        step = lambda: sft_step(engine, seqs, cfg, 1e-6, world)  # noqa: E731
    else:
        cfg = OpdConfig(train=train, optim=optim, importance_weights=ImportanceWeightsConfig(enabled=True))
        samples = opd_samples(args.batch, args.median_len, args.max_len, vocab, rng)
        lens = [len(s) for s in samples]
        step = lambda: opd_step(engine, split_minis(samples, 1, 0, world), cfg, 1e-6, world)  # noqa: E731
    times = timed(step, args.steps)
    if args.profile:
        profile(step, Path(args.profile) / f"{name}-profile.txt")
    med = statistics.median(times)
    tokens = sum(lens)
    flops = flops_per_token(SHAPES[args.shape], mean_ctx(lens)) * tokens
    out = {"kind": "train", "zero": zero, "step_s": round(med, 4), "tokens_per_step": tokens,
           "tokens_per_s": round(tokens / med),
           "tflops": round(flops / med / 1e12, 1),
           "mfu": round(flops / med / PEAK_BF16, 4) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
        torch.cuda.reset_peak_memory_stats()
    return out


def score(args) -> dict:
    """Teacher scoring with the torch scorer (:class:`lopd.inference.torch_scorer.TorchScorer`): a
    forward over packed batches of ``--score-tokens`` tokens, the LM head at response positions
    only; MFU counts one forward per token (2·P + 4·L·H·d·ctx)."""
    from lopd.inference.torch_scorer import TorchScorer
    from lopd.sections import InferenceConfig

    model = make_model(args.shape, args.attn if args.attn != "varlen" else "sdpa")
    attn = "lopd_varlen" if args.attn == "varlen" else None
    if attn:
        from lopd.train.varlen import set_attention

        set_attention(model, "varlen")
    scorer = TorchScorer(None, InferenceConfig(backend="torch", max_num_seqs=4096), max_batch_tokens=args.score_tokens,
                         model=model, attn_implementation=attn)
    rng = np.random.default_rng(2)
    lens = lengths(max(8, 4 * args.score_tokens // args.median_len), args.median_len, args.max_len, rng)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [rng.integers(0, vocab, prompt_len(n)).tolist() for n in lens]
    responses = [rng.integers(0, vocab, n - prompt_len(n)).tolist() for n in lens]
    times = timed(lambda: scorer.score(prompts, responses), args.steps)
    med = statistics.median(times)
    tokens = sum(lens)
    flops = flops_per_token(SHAPES[args.shape], mean_ctx(lens), passes="forward") * tokens
    out = {"kind": "score", "attn": scorer.attn, "batch_tokens": scorer.budget, "sequences": len(lens),
           "tokens": tokens, "response_tokens": sum(len(r) for r in responses), "seconds": round(med, 4),
           "tokens_per_s": round(tokens / med), "tflops": round(flops / med / 1e12, 1),
           "mfu": round(flops / med / PEAK_BF16, 4) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 1)
    return out


def parity(args, world: int) -> dict:
    """bf16 engine log-probs vs an fp32 copy; the all-reduce backend; OPD's teacher == student identity."""
    import torch.distributed as dist

    from lopd.opd_config import OpdConfig
    from lopd.train.engine import build_engine, device, forward_logprobs
    from lopd.train.losses import model_logprobs
    from lopd.train.opd import opd_step
    from lopd.train.packing import make_micro_batches
    from lopd.train.step import all_reduce
    from lopd.train_config import OptimConfig, TrainConfig

    train = TrainConfig(steps=10, global_batch=8, micro_batch_tokens=4096, zero_stage=0, gradient_checkpointing=False)
    model = make_model(args.shape, args.attn, seed=1)
    ref = make_model(args.shape, args.attn, seed=1).float().to(device()).eval()
    engine = build_engine(model, train, OptimConfig(lr=1e-3, grad_clip=1e9, weight_decay=0.0), chunk_size=1024)
    rng = np.random.default_rng(1)
    samples = opd_samples(8, 256, 512, SHAPES[args.shape]["vocab_size"], rng)
    mbs = [mb.to(device()) for mb in make_micro_batches([s.to_seq(i) for i, s in enumerate(samples)], 4096)]
    own: dict[int, list[torch.Tensor]] = {}
    diffs = []
    with torch.no_grad():
        for mb in mbs:  # the layout opd_step makes (same budget): the same forwards, bit for bit
            lp, _ = forward_logprobs(engine, mb)
            lp32, _ = model_logprobs(ref, mb.input_ids, mb.position_ids, mb.targets, mb.select, mb.attention_mask)
            diffs.append((lp.float() - lp32).abs())
            for i in mb.seq_index.unique().tolist():
                own.setdefault(i, []).append(lp.float()[mb.seq_index == i].cpu())
    diff = torch.cat(diffs)
    # identity: teacher log-probs = the student's own -> A = 0 exactly -> zero gradient, no update
    for i, s in enumerate(samples):
        s.teacher_logprobs = torch.cat(own[i]).numpy()
        s.rollout_logprobs = s.teacher_logprobs.copy()
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    m = opd_step(engine, [samples], OpdConfig(train=train), 1e-3, world)
    params = list(engine.module.parameters())
    moved = max(float((p.detach().float() - b).abs().max()) for p, b in zip(params, before, strict=True))
    return {"backend": dist.get_backend(), "dtype": str(next(engine.module.parameters()).dtype),
            "all_reduce_ok": all_reduce([1.0])[0] == float(world), "logprob_mean_abs_diff_vs_fp32": float(diff.mean()),
            "logprob_max_abs_diff_vs_fp32": float(diff.max()), "identity_adv_mean": m["adv_mean"],
            "identity_grad_norm": m["grad_norm"], "identity_max_param_change": moved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-1.7b" if torch.cuda.is_available() else "tiny", choices=DENSE)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--median-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--grad-ckpt", default="full", choices=list(CKPT),
                    help="train.gradient_checkpointing: off, full (true) or selective")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_const", const="off", help="= --grad-ckpt off")
    ap.add_argument("--compile", default="off", choices=list(COMPILE), help="train.compile of the decoder layers")
    ap.add_argument("--bf16-accum", dest="fp32_accum", action="store_false",
                    help="train.grad_accum_fp32: false (add up gradients in bf16, DeepSpeed's default)")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, flex_attention, ...) or "
                    "varlen (lopd's flat varlen packing, train.attention: varlen)")
    ap.add_argument("--only", default="parity,sft,opd,opd-z3")
    ap.add_argument("--profile", metavar="DIR", help="also write a torch.profiler table of one step per variant here")
    ap.add_argument("--score-tokens", type=int, default=65536, help="score: tokens per scoring batch")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="recorded in the JSON line")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child:  # each variant in its own process: a DeepSpeed engine does not give its memory back
        return parent(args)
    if not torch.cuda.is_available():
        torch.set_num_threads(2)

    from lopd.train.engine import init_distributed

    _, world = init_distributed()
    name = args.only
    t0 = time.perf_counter()
    try:
        res = parity(args, world) if name == "parity" else score(args) if name == "score" else \
            run_variant(name, args, world)
    except Exception as e:  # e.g. out of memory: reported in the JSON line, the other variants still run
        res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"world": world, name: res}))


def parent(args) -> None:
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger (made at import) writes to stdout
        import deepspeed
    out: dict = {"bench": "gpu_step", "date": args.date, "shape": args.shape, "device": torch.cuda.get_device_name()
                 if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                 "deepspeed": deepspeed.__version__,
                 "transformers": __import__("transformers").__version__,
                 "attn": args.attn, "grad_ckpt": args.grad_ckpt, "compile": args.compile,
                 "grad_accum_fp32": args.fp32_accum, "batch": args.batch,
                 "micro_batch_tokens": args.micro_batch_tokens, "matmul_params": matmul_params(SHAPES[args.shape]),
                 "matmul_tflops": matmul_tflops()}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    argv = list(sys.argv[1:])
    if "--only" in argv:
        k = argv.index("--only")
        del argv[k:k + 2]
    for name in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, *argv, "--only", name, "--child"], stdout=subprocess.PIPE,
                              text=True)
        lines = proc.stdout.strip().splitlines()
        res = json.loads(lines[-1]) if proc.returncode == 0 and lines else {name: {"error": f"exit {proc.returncode}"}}
        out["world"] = res.pop("world", None)
        out.update(res)
        print(f"# {name}: {out[name]}", file=sys.stderr, flush=True)
    if out["matmul_tflops"]:
        for name in ("sft", "opd", "opd-z3"):
            if isinstance(out.get(name), dict) and "tflops" in out[name]:
                out[name]["of_matmul"] = round(out[name]["tflops"] / out["matmul_tflops"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""How the decoder layers run, timed side by side: an OPD step (:func:`lopd.train.opd.opd_step`,
1 rank, ZeRO-0, fp32 on CPU) with ``train.gradient_checkpointing`` off / full / selective and with
``train.compile`` (inductor, full checkpointing), each on its own engine over the same weights and
rollouts, timed round-robin (the order reversed every round) after one warm-up round that also
compiles. Prints ONE JSON line: the median step time per setting, the ratios to full
checkpointing (the recipes' default) and the largest loss gap between settings.

    python tests/benchmarks/bench_layers.py [--quick] [--threads N] [--no-compile]

On CPU, inductor generates C++ (a minute or two to compile at the first step) and the step times
say little about a GPU's, where the matmuls dominate: ``make gpu-check`` measures the same
settings on the 1.7B shape.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             intermediate_size=768, vocab_size=8192, tie_word_embeddings=True)
"""A small Qwen3 whose layers, not its LM head, take most of a step."""


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lopd.recipe import OpdConfig
    from lopd.train.data import OpdSample
    from lopd.train.engine import build_engine, init_distributed
    from lopd.train.opd import opd_step

    quick = "--quick" in sys.argv
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    steps, batch, response_len = (3, 8, 192) if quick else (5, 16, 256)
    settings = {"off": {"gradient_checkpointing": False}, "full": {"gradient_checkpointing": True},
                "selective": {"gradient_checkpointing": "selective"}}
    if "--no-compile" not in sys.argv:
        settings["compiled"] = {"gradient_checkpointing": True, "compile": "inductor"}
    init_distributed()
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE)).float().state_dict()
    rng = np.random.default_rng(0)
    vocab = SHAPE["vocab_size"]
    samples = [OpdSample(f"p{i}", 0, rng.integers(3, vocab, 64), rng.integers(3, vocab, response_len),
                         *(rng.standard_normal((2, response_len)) - 3.0).astype(np.float32)) for i in range(batch)]
    runs = {}
    for name, layers in settings.items():
        cfg = OpdConfig(train={**layers, "zero_stage": 0, "micro_batch_tokens": 2048, "global_batch": batch})
        model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE)).float()
        model.load_state_dict(state)
        runs[name] = (build_engine(model, cfg.train, cfg.optim, chunk_size=1024), cfg)
    times: dict[str, list[float]] = {name: [] for name in settings}
    loss: dict[str, float] = {}
    t_first: dict[str, float] = {}
    names = list(settings)
    for r in range(steps + 1):  # round 0: warm-up (and compilation)
        for name in (names if r % 2 == 0 else names[::-1]):
            engine, cfg = runs[name]
            t0 = time.perf_counter()
            loss[name] = opd_step(engine, [samples], cfg, 0.0, 1)["loss"]  # lr 0: the same work every step
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            else:
                t_first[name] = dt
    med = {name: statistics.median(t) for name, t in times.items()}
    out = {"bench": "train_layers", "device": "cpu", "torch_threads": torch.get_num_threads(), "shape": SHAPE,
           "batch": batch, "response_tokens": batch * response_len, "repeats": steps,
           **{f"step_s_{n}": round(t, 4) for n, t in med.items()},
           **{f"{n}_vs_full": round(t / med["full"], 3) for n, t in med.items() if n != "full"},
           "first_step_s": {n: round(t, 2) for n, t in t_first.items()},
           "max_abs_loss_diff_vs_off": max(abs(v - loss["off"]) for v in loss.values())}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

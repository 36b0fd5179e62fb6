"""Host syncs and operator launches per micro-batch of one SFT and one OPD step, counted on CPU.

On a GPU every host sync drains the launch queue, and every operator is at least one kernel
launch, so both set a floor under the step time that no amount of arithmetic hides. Neither
needs a GPU to count: this benchmark runs lopd's own training step (``build_engine`` →
DeepSpeed, ``sft_step`` / ``opd_step``, packed micro-batches, the chunked LM head) on a small
random Qwen3, one rank on gloo, and counts during one step (after a warm-up step):

- **syncs**: every call that, on a GPU, waits for the device: ``Tensor.item`` / ``tolist`` /
  ``cpu`` / ``numpy`` / ``__bool__`` / ``__float__`` / ``__int__`` on a tensor the GPU run keeps
  on the device (wherever they are called: lopd, DeepSpeed or transformers; :class:`Census`
  says how host tensors are told apart), the accelerator's ``synchronize`` (DeepSpeed's
  timers), and the operators whose output size depends on data (``aten::nonzero``,
  ``aten::masked_select``: boolean-mask indexing) from the profiler;
- **ops**: leaf ``aten::`` operators dispatched, metadata-only ones (views, reshapes, empty)
  left out: a proxy for kernel launches (on a GPU most are one launch each).

One JSON line per step kind, ZeRO stage and ``train.attention`` (sdpa: packed rows, transformers'
block mask; varlen: flat rows, the boundaries from the host), with counts per micro-batch, by kind and by call site
(``sync_sites``: who asked); the target
the training path is held to is ≤ 1 sync per micro-batch.

    .venv/bin/python tests/benchmarks/bench_census.py [--zero 0,2] [--attention sdpa,varlen] [--batch 16]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, vocab_size=4096, tie_word_embeddings=True)
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
SYNC_OPS = ("aten::nonzero", "aten::masked_select", "aten::nonzero_static", "aten::unique", "aten::_unique2")
CPU_FALLBACK = "lopd/train/varlen.py"
"""On CPU, varlen attention runs an exact per-sequence loop that reads the boundaries back (a GPU in
bf16 hands them to the varlen kernel instead): those reads are reported apart, not as syncs."""
# metadata-only operators: no kernel on a GPU
NO_KERNEL = {"aten::as_strided", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::expand", "aten::t",
             "aten::transpose", "aten::permute", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
             "aten::detach", "aten::alias", "aten::resolve_conj", "aten::resolve_neg", "aten::empty",
             "aten::empty_strided", "aten::lift_fresh", "aten::_unsafe_view", "aten::unflatten", "aten::split",
             "aten::chunk", "aten::narrow", "aten::flatten", "aten::view_as", "aten::expand_as", "aten::empty_like",
             "aten::is_nonzero", "aten::_local_scalar_dense", "aten::item", "aten::set_"}


def call_site() -> str:
    """``path:line`` of the first caller outside torch (and this file): who asked for the sync."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "?"
    name = f.f_code.co_filename
    for root in ("/site-packages/", str(REPO) + "/"):
        if root in name:
            name = name.split(root, 1)[1]
    return f"{name}:{f.f_lineno}"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_host(t: torch.Tensor) -> bool:
    if torch.cuda.is_available():  # on a GPU the device says it
        return t.device.type == "cpu"
    return getattr(t, "_census_host", False)


class Census(TorchFunctionMode):
    """Counts the calls that would wait for a GPU, telling host tensors from device ones.

    On a GPU a tensor's device tells. On CPU every tensor lives on the host, so the tensors a GPU
    run would keep on the host are tracked: a tensor made without a ``device`` argument
    (``torch.tensor``, ``zeros``…, as the GPU code path makes them: its device tensors are made
    with ``device=``), ``.cpu()`` results and anything computed only from host tensors;
    ``.to(dev)`` moves a tensor to the "device". Everything else (parameters, activations,
    gradients, what autograd makes, ``from_numpy`` results) counts as device-resident. A sync
    method called on a device tensor is a sync; on a host tensor it is free and not counted. The
    accelerator's ``synchronize`` (DeepSpeed's
    timers) always counts."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()
        self.fallback: collections.Counter = collections.Counter()
        self.active = False
        self._saved: list[tuple[object, str, object]] = []

    def _count(self, label: str) -> None:
        if self.active:
            site = call_site()
            if site.startswith(CPU_FALLBACK) and not torch.cuda.is_available():
                self.fallback[f"{label} {site}"] += 1  # the CPU-only attention loop: no GPU run makes it
                return
            self.counts[label] += 1
            self.sites[f"{label} {site}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        if name in SYNC_METHODS and inputs and not _is_host(inputs[0]):
            self._count(f"Tensor.{name}")
        out = func(*args, **kwargs)
        if name in ("to", "cuda"):  # .to(dev) / .to(dtype): host follows the input unless a device is named
            named = kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args[1:])
            host = (not named and inputs and _is_host(inputs[0])) or name == "cpu"
        elif name == "cpu" or name == "pin_memory":
            host = True
        else:
            host = kwargs.get("device") is None and all(_is_host(t) for t in inputs)
        for t in _tensors(out):
            try:
                t._census_host = bool(host)
            except (AttributeError, RuntimeError):
                pass
        return out

    def _wrap(self, owner, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            self._count(label)
            return orig(*args, **kwargs)

        self._saved.append((owner, name, orig))
        setattr(owner, name, counted)

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        self._wrap(get_accelerator(), "synchronize", "accelerator.synchronize")
        self._wrap(torch.cuda, "synchronize", "cuda.synchronize")
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        return super().__exit__(*exc)


def leaf_ops(prof) -> collections.Counter:
    """Leaf ``aten::`` operator events (no ``aten::`` child) that launch work, by name."""
    out: collections.Counter = collections.Counter()
    for ev in prof.events():
        if (ev.name.startswith("aten::") and ev.name not in NO_KERNEL
                and not any(c.name.startswith("aten::") for c in ev.cpu_children)):
            out[ev.name] += 1
    return out


def mark_host_step_counters(engine) -> None:
    """Tell the census that the optimizer's step counters are host tensors: on a GPU torch's
    AdamW keeps them on the host unless ``fused`` or ``capturable`` (then they are made with
    ``device=``), so reading them there is free. On CPU torch's AdamW reads them per parameter."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    if opt is None:
        return
    for group in opt.param_groups:
        if group.get("fused") or group.get("capturable"):
            continue
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                step._census_host = True


def count_step(step, micro_batches: int, engine) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: first-call work (allocator, optimizer state) is not per micro-batch
    mark_host_step_counters(engine)
    with Census() as census, profile(activities=[ProfilerActivity.CPU]) as prof:
        census.active = True
        step()
        census.active = False
    ops = leaf_ops(prof)
    all_ops = collections.Counter(ev.name for ev in prof.events())
    syncs = dict(census.counts)
    for name in SYNC_OPS:
        if all_ops[name]:
            syncs[name] = all_ops[name]
    total = sum(syncs.values())
    return {"micro_batches": micro_batches, "syncs_per_micro_batch": round(total / micro_batches, 2),
            "syncs_per_step": total, "syncs_by_kind": dict(sorted(syncs.items())),
            "sync_sites": dict(census.sites.most_common(12)), "cpu_fallback_reads": sum(census.fallback.values()),
            "ops_per_micro_batch": round(sum(ops.values()) / micro_batches, 1),
            "top_ops": dict(ops.most_common(8)), "sync_target_per_micro_batch": 1,
            "meets_target": total / micro_batches <= 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero", default="0,2", help="ZeRO stages to count, comma-separated")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--micro-batch-tokens", type=int, default=1024)
    ap.add_argument("--attention", default="sdpa,varlen", help="train.attention values to count, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM, Qwen3Config

    from lopd.opd_config import OpdConfig
    from lopd.train.data import OpdSample
    from lopd.train.engine import build_engine, device, init_distributed
    from lopd.train.opd import batch_seqs, opd_step
    from lopd.train.packing import Seq, make_micro_batches
    from lopd.train.sft import sft_step
    from lopd.train.varlen import set_attention
    from lopd.train_config import SftConfig

    init_distributed()
    rng = np.random.default_rng(0)
    vocab = SHAPE["vocab_size"]
    lens = np.clip(rng.lognormal(np.log(160), 0.6, args.batch).astype(int), 32, 512)
    seqs = []
    for n in lens:
        labels = np.zeros(n, bool)
        labels[n // 4:] = True
        seqs.append(Seq(rng.integers(3, vocab, n), labels))
    samples = [OpdSample(f"p{i}", 0, rng.integers(3, vocab, n // 4), rng.integers(3, vocab, n - n // 4),
                         *(rng.standard_normal((2, n - n // 4)) - 3.0).astype(np.float32))
               for i, n in enumerate(lens)]
    for zero, attention in ((int(z), a) for z in args.zero.split(",") for a in args.attention.split(",")):
        train = {"zero_stage": zero, "gradient_checkpointing": True, "micro_batch_tokens": args.micro_batch_tokens,
                 "global_batch": args.batch, "max_seq_len": 512, "attention": attention}
        flat = attention == "varlen"
        for kind in ("sft", "opd"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE)).float().to(device())
            set_attention(model, attention)
            cfg = SftConfig(train=train) if kind == "sft" else OpdConfig(train=train)
            engine = build_engine(model, cfg.train, cfg.optim, chunk_size=256)
            if kind == "sft":
                mbs = len(make_micro_batches(seqs, args.micro_batch_tokens, packing=True, flat=flat))
                step = lambda e=engine, c=cfg: sft_step(e, seqs, c, 0.0, 1)  # noqa: E731
            else:
                mbs = len(make_micro_batches(batch_seqs(samples, 0), args.micro_batch_tokens, packing=True, flat=flat))
                step = lambda e=engine, c=cfg: opd_step(e, [samples], c, 0.0, 1)  # noqa: E731
            res = count_step(step, mbs, engine)
            print(json.dumps({"bench": "sync_census", "step": kind, "zero": zero, "attention": attention,
                              "batch": args.batch,
                              "micro_batch_tokens": args.micro_batch_tokens, "shape": SHAPE, **res}),
                  file=sys.__stdout__, flush=True)
            del engine, model


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # library chatter (DeepSpeed's op build) off the JSON lines
        main()

"""The training stages (sft, opd) on tiny models, without the other stages' jobs.

OPD: publish an SFT checkpoint and precompute parquet with the real schemas and manifests
(:func:`make_run`), rollouts sampled from and scored by real models (:func:`precompute_rows`).
SFT: publish sft-data conversations (:func:`sft_recipe`). Both: run the real entrypoint in a
subprocess (:func:`run_job`; torchrun for several ranks, gloo) and read what it published.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml

from lopd.data.schemas import PRECOMPUTE, SFT_DATA, write_table
from lopd.fingerprint import fingerprint
from lopd.layout import stage_prefix
from lopd.manifest import publish
from lopd.store import open_store
from tests.helpers.cli import REPO

RUN = "t"
TEACHER_FP = "f" * 64  # the teacher fingerprint the published sft-data records


def scale_weights(src: Path, dst: Path, factor: float) -> Path:
    """A copy of a model with weights scaled (init-model weights give near-uniform policies)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(factor)
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def logprobs_of(model_dir: Path, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    from lopd.train.losses import model_logprobs

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            ids = torch.tensor([p + r])
            sel = torch.zeros_like(ids, dtype=torch.bool)
            sel[0, len(p) - 1:len(p) + len(r) - 1] = True
            tgt = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
            lp, _ = model_logprobs(m, ids, torch.arange(ids.shape[1]).unsqueeze(0), tgt, sel)
            out.append(lp.numpy().astype(np.float32))
    return out


def sample_responses(model_dir: Path, prompts: list[list[int]], seed: int, max_new: int = 12) -> list[list[int]]:
    """Rollouts sampled from the model (temperature 1), as the precompute stage would."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for p in prompts:
            g = m.generate(torch.tensor([p]), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                           max_new_tokens=max_new, min_new_tokens=2, pad_token_id=0)
            out.append(g[0, len(p):].tolist())
    return out


def precompute_rows(student: Path, teacher: Path, n: int, vocab: int, seed: int = 0) -> dict[str, list]:
    """``n`` random prompts of token ids below ``vocab`` (capped at the model's), sampled and scored."""
    from transformers import AutoConfig

    vocab = min(vocab, AutoConfig.from_pretrained(student).vocab_size)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(3, 9)).tolist() for _ in range(n)]
    responses = sample_responses(student, prompts, seed)
    return {"prompt_id": [f"p{i:03d}" for i in range(n)], "sample_index": [0] * n,
            "prompt_token_ids": prompts, "response_token_ids": responses,
            "teacher_logprobs": logprobs_of(teacher, prompts, responses),
            "rollout_logprobs": logprobs_of(student, prompts, responses),
            "finish_reason": ["stop"] * n, "answer": [None] * n}


def publish_sft(store_uri: str, model: Path, teacher_fp: str) -> str:
    store = open_store(store_uri)
    publish(store, stage_prefix(RUN, "sft"), model, stage="sft", run_id=RUN,
            lineage={"teacher_fingerprint": teacher_fp})
    return store.url(stage_prefix(RUN, "sft"))


def publish_precompute(store_uri: str, rows: dict[str, list], tmp: Path, lineage: dict, shards: int = 2,
                       schema: pa.Schema = PRECOMPUTE, stage: str = "precompute") -> None:
    """Write rows as ``shards`` parquet files and publish them under runs/t/<stage> (manifest last)."""
    local = tmp / f"{stage}-out"
    local.mkdir(parents=True, exist_ok=True)
    n = len(rows["prompt_id"])
    for s in range(shards):
        part = {k: v[s::shards] for k, v in rows.items()}
        d = local / "shards" / f"{s}-of-{shards}"
        d.mkdir(parents=True, exist_ok=True)
        write_table(pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in part.items()}),
                    d / "part-00000.parquet", schema)
    assert n
    publish(open_store(store_uri), stage_prefix(RUN, stage), local, stage=stage, run_id=RUN, lineage=lineage)


def write_recipe(path: Path, store_uri: str, teacher: Path, student: Path, **opd) -> Path:
    train = {"steps": 6, "global_batch": 24, "micro_batch_tokens": 48, "max_seq_len": 64, "zero_stage": 0,
             "gradient_checkpointing": False, "checkpoint_every": 2, "seed": 0, **opd.pop("train", {})}
    recipe = {"run_id": RUN, "store": store_uri,
              "models": {"teacher": {"uri": str(teacher)}, "student": {"uri": str(student)}},
              "opd": {"optim": {"lr": 5e-4, "weight_decay": 0.0}, "train": train,
                      "mini_batches": 2, "clip_low": 0.02, "clip_high": 0.02, **opd}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_job(module: str, recipe: Path, *extra: str, nproc: int = 1, env: dict | None = None,
            check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*base, "-m", module, "--recipe", str(recipe), *extra]
    e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    with subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: torchrun stops its workers (each in its own session) on SIGTERM
            p.send_signal(signal.SIGTERM)
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(store_uri: str, stage: str = "opd") -> list[dict]:
    raw = open_store(store_uri).read_bytes(f"{stage_prefix(RUN, stage)}/metrics.jsonl")
    return [json.loads(line) for line in raw.decode().splitlines()]


def final_weights(store_uri: str, tmp: Path, stage: str = "opd") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    store = open_store(store_uri)
    store.get_file(f"{stage_prefix(RUN, stage)}/model.safetensors", tmp / f"{stage}-w.safetensors")
    return load_file(str(tmp / f"{stage}-w.safetensors"))


def make_run(tmp: Path, opd_models, rows, store_uri: str | None = None, lineage: dict | None = None, **opd):
    student, teacher = opd_models
    store_uri = store_uri or f"file://{tmp / 'store'}"
    tfp = fingerprint(str(teacher))
    sft_uri = publish_sft(store_uri, student, tfp)
    sfp = fingerprint(sft_uri)
    publish_precompute(store_uri, rows, tmp, lineage or {
        "teacher_fingerprint": tfp, "sft_teacher_fingerprint": tfp, "teacher_consistent": True,
        "allow_inconsistent_teacher": False, "student_fingerprint": sfp, "student": sft_uri})
    return write_recipe(tmp / "recipe.yaml", store_uri, teacher, student, **opd), store_uri


# --------------------------------------------------------------------------- SFT


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 99) for _ in range(3))
        steps = " ".join(f"{a}+{b}={a + b};" for _ in range(rng.randint(1, 4)))  # a spread of lengths
        out.append([{"role": "user", "content": f"Compute {a}+{b}+{c}."},
                    {"role": "assistant", "content": f"{steps} {a + b}+{c}={a + b + c}. The answer is "
                                                     f"\\boxed{{{a + b + c}}}."}])
    return out


def publish_sft_data(store_uri: str, tmp: Path, n: int = 32, convs: list[list[dict]] | None = None) -> None:
    """Publish ``convs`` (default: ``n`` arithmetic conversations) as run ``t``'s sft-data stage."""
    local = tmp / "sft-data-out"
    (local / "shards" / "0-of-1").mkdir(parents=True)
    convs = convs if convs is not None else conversations(n)
    n = len(convs)
    table = pa.table({"prompt_id": [f"s{i:03d}" for i in range(n)], "messages": convs,
                      "num_tokens": [len(c[1]["content"]) for c in convs], "finish_reason": ["stop"] * n})
    write_table(table, local / "shards" / "0-of-1" / "part-00000.parquet", SFT_DATA)
    publish(open_store(store_uri), stage_prefix(RUN, "sft-data"), local, stage="sft-data", run_id=RUN,
            lineage={"teacher_fingerprint": TEACHER_FP})


def sft_recipe(tmp: Path, model: Path, **train) -> tuple[Path, str]:
    store_uri = f"file://{tmp / 'store'}"
    publish_sft_data(store_uri, tmp)
    t = {"steps": 8, "global_batch": 8, "micro_batch_tokens": 160, "max_seq_len": 128, "zero_stage": 0,
         "gradient_checkpointing": False, "checkpoint_every": 4, **train}
    recipe = {"run_id": RUN, "store": store_uri,
              "models": {"teacher": {"uri": str(model)}, "student": {"uri": str(model)}},
              "sft": {"optim": {"lr": 3e-3, "schedule": "cosine", "warmup_ratio": 0.25, "weight_decay": 0.0},
                      "train": t}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp / "recipe.yaml", store_uri

"""The whole pipeline at Qwen3's real vocabulary with its stock chat template and thinking on:
``lopd pipeline`` runs sft-data → sft → precompute → opd → eval on a tiny random Qwen3 with the
151,936-row embedding (teacher and student: the same model, as the lineage check allows).
A random teacher never ends a turn within a few tokens, so its answers stop on the length limit
and the recipe masks them (``sft.truncated: mask``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.cli import REPO

RUN = "qwen3"
VLLM = {"backend": "vllm", "gpu_memory_utilization": 0.05, "max_model_len": 256, "max_num_seqs": 16}
SMALL = {"gpus_per_node": 0, "cpu": "2", "memory": "8Gi", "shm_size": "1Gi"}
TRAIN = {"steps": 2, "global_batch": 4, "micro_batch_tokens": 512, "max_seq_len": 128, "zero_stage": 0,
         "gradient_checkpointing": False, "checkpoint_every": 2}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(tmp, model) -> dict:
    def prompts(name, n):
        return write_jsonl(tmp / f"{name}.jsonl", [{"prompt_id": f"{name}{i}", "prompt": f"What is {i} + {i + 3}?",
                                                    "answer": str(2 * i + 3)} for i in range(n)])

    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 10, "enable_thinking": True}
    return {"run_id": RUN, "store": f"file://{tmp / 'store'}",
            "models": {"teacher": {"uri": str(model)}, "student": {"uri": str(model)}},
            "sft_data": {"prompts": prompts("sft", 6), "sampling": {**sampling, "seed": 0}, "inference": VLLM,
                         "resources": SMALL},
            "sft": {"truncated": "mask", "optim": {"lr": 1e-3}, "train": TRAIN, "resources": SMALL},
            "precompute": {"prompts": prompts("opd", 6), "sampling": {**sampling, "seed": 1}, "inference": VLLM,
                           "resources": SMALL},
            "opd": {"optim": {"lr": 1e-4}, "train": TRAIN, "resources": SMALL},
            # eval: the opd checkpoint only, on the transformers backend (vLLM ran twice already)
            "eval": {"benchmarks": ["arith"], "k": 1, "sampling": {**sampling, "max_tokens": 8},
                     "inference": {"backend": "hf", "max_model_len": 256},
                     "checkpoints": [f"opd=file://{tmp / 'store'}/runs/{RUN}/opd"],
                     "datasets": {"arith": {"path": prompts("arith", 3), "kind": "math", "prompt_template": "{problem}",
                                            "fields": {"id": "prompt_id", "problem": "prompt"}}},
                     "resources": SMALL}}


@pytest.mark.timeout(1200)  # about 2 min on a quiet 2-core machine; a loaded one is several times slower
def test_real_vocab_pipeline_stock_template_thinking(qwen3_model, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, qwen3_model)))
    proc = subprocess.run([sys.executable, "-m", "lopd.cli", "pipeline", "-r", str(path)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = tmp_path / "store" / "runs" / RUN

    def manifest(stage):
        return json.loads((runs / stage / "MANIFEST.json").read_text())

    sft_data = manifest("sft-data")
    assert sft_data["lineage"]["enable_thinking"] is True
    assert sft_data["lineage"]["chat_rendering"]["prompt"][-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n
    rows = [r for f in sft_data["files"] for r in pq.read_table(runs / "sft-data" / f["path"]).to_pylist()]
    assert len(rows) == 6 and {r["finish_reason"] for r in rows} <= {"stop", "length"}
    sft = manifest("sft")
    cut = sum(r["finish_reason"] == "length" for r in rows)
    assert sft["metrics"]["truncated_masked"] == cut and sft["metrics"]["truncated_dropped"] == 0
    assert sft["metrics"]["conversations"] == 6 and sft["lineage"]["teacher_fingerprint"]
    pre = manifest("precompute")
    assert pre["lineage"]["teacher_consistent"] is True
    ids = [t for f in pre["files"] for r in pq.read_table(runs / "precompute" / f["path"]).to_pylist()
           for t in r["prompt_token_ids"]]
    assert max(ids) > 100000  # the prompts are real Qwen3 ids (special tokens at 151643+)
    assert manifest("opd")["metrics"]["steps"] == 2
    summary = json.loads((runs / "eval" / "report" / "summary.json").read_text())
    assert list(summary["checkpoint_uris"]) == ["opd"] and manifest("eval")["metrics"]["samples"] == 3

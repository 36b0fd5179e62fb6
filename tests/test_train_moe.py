"""A Qwen3-MoE student trains through the same OPD and SFT code (lopd init-model --arch qwen3-moe)."""

from __future__ import annotations

import numpy as np
import pytest

from lopd.layout import stage_prefix
from lopd.manifest import read_manifest
from lopd.store import open_store
from tests.helpers.cli import lopd_cli
from tests.helpers.training import RUN, make_run, precompute_rows, read_metrics, run_job, scale_weights


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, tiny_model, teacher_model):
    d = tmp_path_factory.mktemp("moe")
    lopd_cli("init-model", "--out", str(d / "moe0"), "--arch", "qwen3-moe", "--tokenizer", str(tiny_model),
             "--seed", "3")
    return scale_weights(d / "moe0", d / "student", 3.0), scale_weights(teacher_model, d / "teacher", 3.0)


def test_moe_student_offline_opd(tmp_path, moe_models):
    student, teacher = moe_models
    rows = precompute_rows(student, teacher, 12, 384, seed=1)
    recipe, uri = make_run(tmp_path, moe_models, rows,
                           train={"steps": 3, "global_batch": 12, "checkpoint_every": 10, "zero_stage": 2})
    run_job("jobs.opd", recipe)
    hist = read_metrics(uri)
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in hist)
    assert hist[-1]["reverse_kl_est"] < hist[0]["reverse_kl_est"]
    m, _ = read_manifest(open_store(uri), stage_prefix(RUN, "opd"))
    from transformers import AutoModelForCausalLM

    from lopd.manifest import fetch

    model = AutoModelForCausalLM.from_pretrained(fetch(open_store(uri), stage_prefix(RUN, "opd"), tmp_path / "f"))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"

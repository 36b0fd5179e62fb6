"""SFT through jobs/sft.py: assistant-only loss, packing == padding, schedule, lineage, resume."""

from __future__ import annotations

import pytest
import torch

from lopd.layout import stage_prefix
from lopd.manifest import read_manifest
from lopd.store import open_store
from lopd.train.engine import lr_at
from lopd.train.packing import pack, pad
from lopd.train.sft_rows import encode_sft_row
from tests.helpers.training import RUN, TEACHER_FP, conversations, final_weights, read_metrics, run_job, sft_recipe


def test_assistant_mask_covers_only_the_assistant_turn(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv = conversations(1)[0]
    seq = encode_sft_row(tok, conv, 512, "row 0")
    target_text = tok.decode(seq.tokens[seq.labels])
    assert conv[1]["content"] in target_text and "Compute" not in target_text


def test_packed_loss_equals_padded_loss(tiny_model):
    """Same per-token log-probs (hence loss and gradient) packed or padded: no cross-sequence attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.train.losses import model_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    seqs = [encode_sft_row(tok, c, 512, "r") for c in conversations(6)]
    for i, s in enumerate(seqs):
        s.index = i

    def all_lp(mbs):
        with torch.no_grad():
            return torch.cat([model_logprobs(model, m.input_ids, m.position_ids, m.targets, m.select,
                                             m.attention_mask)[0] for m in mbs])
    packed, padded = pack(seqs, 256), pad(seqs, 256)
    assert len(packed) >= 1 and len(padded) >= 1
    torch.testing.assert_close(all_lp(packed), all_lp(padded), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("sft")
    recipe, store_uri = sft_recipe(tmp, tiny_model)
    run_job("jobs.sft", recipe)
    return recipe, store_uri, tmp


def test_sft_end_to_end(sft_run, tmp_path):
    recipe, store_uri, _ = sft_run
    m, _ = read_manifest(open_store(store_uri), stage_prefix(RUN, "sft"))
    assert m.lineage["teacher_fingerprint"] == TEACHER_FP  # what precompute's consistency check reads
    assert m.lineage["student_base_fingerprint"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "curves.png"} <= {
        f.path for f in m.files}
    hist = read_metrics(store_uri, "sft")
    assert hist[-1]["loss"] < 0.9 * hist[0]["loss"]
    from lopd.recipe import load_recipe

    optim = load_recipe(recipe).sft.optim
    assert [h["lr"] for h in hist] == pytest.approx([lr_at(s, 8, optim) for s in range(8)])
    assert hist[0]["lr"] < hist[1]["lr"] and hist[1]["lr"] == pytest.approx(3e-3) and hist[-1]["lr"] < 3e-3 / 2
    # the published checkpoint is what precompute / vLLM load: HF format, the stage's own fingerprint
    from lopd.models import resolve_model

    resolved = resolve_model(open_store(store_uri).url(stage_prefix(RUN, "sft")))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(resolved.path)
    assert resolved.lineage["teacher_fingerprint"] == TEACHER_FP


def test_bf16_resume_sft_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_model):
    """``models.student.dtype: bfloat16`` trains in bf16 on CPU too (DeepSpeed keeps fp32 master
    weights and Adam state), as on GPUs. Killed after step 5 (checkpoint at 4) and resumed, the run
    publishes the same bf16 weights and the same losses as an uninterrupted one: the master
    weights and moments come back exactly, not rounded through bf16 (fp32 kill-and-resume: the
    OPD and two-rank tests in test_train_opd / test_train_checkpoint)."""
    import yaml

    runs = {}
    for name, env in (("whole", {}), ("resumed", {"LOPD_FAULT_KILL_AFTER_STEP": "5"})):
        d = tmp_path / name
        d.mkdir()
        recipe, uri = sft_recipe(d, tiny_model, zero_stage=1)
        data = yaml.safe_load(recipe.read_text())
        data["models"]["student"]["dtype"] = "bfloat16"
        data["sft"]["optim"]["lr"] = 2e-4  # small steps: a bf16-rounded restore would show
        recipe.write_text(yaml.safe_dump(data))
        if env:
            assert run_job("jobs.sft", recipe, env=env, check=False).returncode == -9
        res = run_job("jobs.sft", recipe)
        assert ('"event": "resume"' in res.stderr) == bool(env)
        runs[name] = (final_weights(uri, d, "sft"), read_metrics(uri, "sft"))
    (wa, ma), (wb, mb) = runs["whole"], runs["resumed"]
    assert all(w.dtype == torch.bfloat16 for w in wa.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in ma] == [h["loss"] for h in mb]

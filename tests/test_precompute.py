"""Stage precompute: rollouts + teacher log-probs, teacher consistency, vocabulary check, bad
input, resume after a kill in phase 2, and the vLLM path compared with transformers.

The "SFT checkpoint" is faked: a tiny model (made to end its turns often) published under
``runs/<run>/sft`` with a manifest whose lineage carries the teacher's fingerprint, as the
sft stage writes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from lopd import LopdError
from lopd.data.chat import TokenizerMismatchError
from lopd.data.schemas import PRECOMPUTE
from lopd.fingerprint import fingerprint
from lopd.inference import load_backend
from lopd.lineage import TeacherMismatchError
from lopd.manifest import publish, read_manifest
from lopd.recipe import InferenceConfig
from lopd.store import open_store
from tests.helpers.cli import REPO, lopd_cli
from tests.helpers.inference import bias_eos, write_prompts

RUN = "pc"
PREFIX = f"runs/{RUN}/precompute"


@pytest.fixture(scope="module")
def models(tiny_model, corpus, tmp_path_factory) -> dict[str, Path]:
    from lopd.modelinit import init_model

    d = tmp_path_factory.mktemp("pcmodels")
    return {"teacher": tiny_model, "student": bias_eos(tiny_model, d / "sft-student"),
            "other_teacher": init_model(d / "other", tokenizer=tiny_model, seed=7),
            "other_vocab": init_model(d / "vocab", corpus=corpus, vocab_size=280, seed=7)}


def setup_run(store_uri: str, models: dict[str, Path], tmp_path: Path, n_prompts: int = 7,
              sft_teacher: str = "teacher", **section) -> Path:
    """Publish the fake SFT checkpoint (lineage: the fingerprint of ``sft_teacher``), write prompts and
    a recipe; returns the recipe path."""
    publish(open_store(store_uri), f"runs/{RUN}/sft", models["student"], stage="sft", run_id=RUN,
            lineage={"teacher_fingerprint": fingerprint(str(models[sft_teacher]))})
    prompts = write_prompts(tmp_path / "opd.jsonl", n_prompts, long_ids=("zz-long",))
    sec = {"prompts": str(prompts), "part_size": 3,
           "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 1},
           "inference": {"backend": "hf", "max_model_len": 256}}
    sec.update(section)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"run_id": RUN, "store": store_uri, "precompute": sec, "models": {
        "teacher": {"uri": str(models["teacher"])}, "student": {"uri": str(models["teacher"])}}}))
    return path


def run_stage(recipe: Path, *args: str) -> None:
    from jobs.precompute import main

    main(["--recipe", str(recipe), *args])


def read_output(store_uri: str, schema=PRECOMPUTE) -> tuple[object, list[dict]]:
    store = open_store(store_uri)
    m, _ = read_manifest(store, PREFIX, verify=True)
    rows = []
    for f in m.files:
        t = pq.read_table(store.fetch(f"{PREFIX}/{f.path}", f.digest, f.bytes))
        assert t.schema.equals(schema, check_metadata=False)
        rows += t.to_pylist()
    return m, rows


def nothing_published(store_uri: str) -> bool:
    return not open_store(store_uri).list(PREFIX)


def check_rows(rows: list[dict], eos_ids: set[int]) -> None:
    """docs/architecture.md invariants: equal per-token lengths; end-of-turn token last iff finished by it."""
    for r in rows:
        n = len(r["response_token_ids"])
        assert n > 0 and len(r["teacher_logprobs"]) == n and len(r["rollout_logprobs"]) == n
        if r["finish_reason"] == "stop":
            assert r["response_token_ids"][-1] in eos_ids
        else:
            assert r["finish_reason"] == "length" and not set(r["response_token_ids"]) & eos_ids


def max_diff(rows: list[dict], model: Path, column: str) -> float:
    """Max |column − transformers scoring of the same tokens with ``model``| over all tokens."""
    b = load_backend(model, InferenceConfig(backend="hf"), dtype="float32")
    scores = b.score([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows])
    return max(float(np.abs(np.asarray(r[column]) - s).max()) for r, s in zip(rows, scores, strict=True))


def test_precompute_with_the_sft_teacher(store_uri, models, tmp_path):
    r = setup_run(store_uri, models, tmp_path, sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
                                                         "seed": 1, "n": 2})
    run_stage(r)
    m, rows = read_output(store_uri)
    fp_t, fp_s = fingerprint(str(models["teacher"])), fingerprint(str(models["student"]))
    assert m.lineage["teacher_consistent"] is True and m.lineage["allow_inconsistent_teacher"] is False
    assert m.lineage["teacher_fingerprint"] == m.lineage["sft_teacher_fingerprint"] == fp_t
    assert m.lineage["student_fingerprint"] == fp_s
    assert m.metrics["prompts"] == 8 and m.metrics["skipped_too_long"] == 1 and m.metrics["rollouts"] == 14
    assert m.metrics["scored_tokens"] == sum(len(r["response_token_ids"]) for r in rows)
    assert sorted((r["prompt_id"], r["sample_index"]) for r in rows) == [(f"p{i:03d}", k) for i in range(7)
                                                                        for k in range(2)]
    assert {r["answer"] for r in rows if r["prompt_id"] == "p002"} == {"9"}
    check_rows(rows, {2})
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    assert m.metrics["truncated"] == sum(r["finish_reason"] == "length" for r in rows) > 0
    assert m.lineage["rollout_logprobs"] == "raw"
    assert m.lineage["sampling"] == {"temperature": 1.0, "top_p": 1.0, "n": 2, "max_tokens": 16, "seed": 1}
    assert m.lineage["teacher_topk"] == 0  # and no top-k columns (the schema check in read_output)
    assert max_diff(rows, models["teacher"], "teacher_logprobs") <= 1e-5
    assert max_diff(rows, models["student"], "rollout_logprobs") <= 1e-5  # the sampler's own log-probs
    # only the scored parts are listed and kept; the phase-1 intermediates are gone
    keys = [o.key for o in open_store(store_uri).list(PREFIX)]
    assert not [k for k in keys if "rollouts-" in k and k.endswith(".parquet")]
    assert [f.path for f in m.files] == [f"shards/0-of-1/part-{i:05d}.parquet" for i in range(3)]


def test_precompute_with_another_teacher_fails_unless_flagged(models, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    r = setup_run(store, models, tmp_path, n_prompts=3)
    other = str(models["other_teacher"])
    fp_t, fp_o = fingerprint(str(models["teacher"])), fingerprint(other)
    with pytest.raises(TeacherMismatchError) as e:
        run_stage(r, "--set", f"models.teacher.uri={other}")
    assert fp_t in str(e.value) and fp_o in str(e.value) and "\n" not in str(e.value)
    assert nothing_published(store)
    # the ablation flag: runs, and the manifest says so
    run_stage(r, "--set", f"models.teacher.uri={other}", "--set", "allow_inconsistent_teacher=true")
    m, rows = read_output(store)
    assert m.lineage["allow_inconsistent_teacher"] is True and m.lineage["teacher_consistent"] is False
    assert m.lineage["teacher_fingerprint"] == fp_o and m.lineage["sft_teacher_fingerprint"] == fp_t
    assert max_diff(rows, models["other_teacher"], "teacher_logprobs") <= 1e-5


def test_precompute_cli_mismatch_is_one_line(models, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    r = setup_run(store, models, tmp_path, n_prompts=2, sft_teacher="other_teacher")
    proc = lopd_cli("run", "precompute", "-r", str(r), check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher consistency:") and "Traceback" not in proc.stderr
    assert fingerprint(str(models["other_teacher"])) in last and fingerprint(str(models["teacher"])) in last
    assert nothing_published(store)


@pytest.mark.parametrize("case,match", [
    ("vocab", r"tokenizer mismatch: teacher has \d+ tokens, SFT student has \d+"),
    ("no-sft", r"^precompute.student: model .*runs/other/sft.* not found"),
    ("no-teacher", r"^models.teacher.uri: model '/nonexistent/t' not found"),
    ("shard", r"--shard-index 3 out of range for --num-shards 2"),
])
def test_precompute_bad_input(case, match, models, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    r = setup_run(store, models, tmp_path, n_prompts=2)
    args = {"vocab": ["--set", f"models.teacher.uri={models['other_vocab']}", "--set",
                      "allow_inconsistent_teacher=true"],
            "no-sft": ["--set", "run_id=other"],
            "no-teacher": ["--set", "models.teacher.uri=/nonexistent/t"],
            "shard": ["--shard-index", "3", "--num-shards", "2"]}[case]
    err = TokenizerMismatchError if case == "vocab" else LopdError
    with pytest.raises(err, match=match):
        run_stage(r, *args)
    assert nothing_published(store) and not open_store(store).list("runs/other")


def test_precompute_resumes_after_kill_between_phases(models, tmp_path):
    """Killed once its rollouts are all written (while the teacher loads or scores): the restart
    re-samples nothing and its output equals an uninterrupted run's."""
    ref_store = f"file://{tmp_path / 'ref'}"
    ref = setup_run(ref_store, models, tmp_path, n_prompts=12)
    run_stage(ref)
    _, want = read_output(ref_store)
    store = f"file://{tmp_path / 'kill'}"
    r = setup_run(store, models, tmp_path, n_prompts=12)
    shard = tmp_path / f"kill/{PREFIX}/shards/0-of-1/parts"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jobs.precompute", "--recipe", str(r)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (shard / "rollouts-00004.json").exists() and proc.poll() is None and time.time() - t0 < 180:
        time.sleep(0.005)
    assert proc.poll() is None, "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(shard.glob("rollouts-*.json"))) == 5 and nothing_published_stage(store)
    rollout_markers = {p.name: p.read_bytes() for p in shard.glob("rollouts-*.json")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith('{"t"')]
    phase1 = [e for e in events if e.get("what") == "precompute rollouts"]
    assert len(phase1) == 5 and all(e["resumed"] for e in phase1)  # no re-sampling
    assert {p.name: p.read_bytes() for p in shard.glob("rollouts-*.json")} == rollout_markers
    _, got = read_output(store)
    assert got == want


def nothing_published_stage(store_uri: str) -> bool:
    s = open_store(store_uri)
    return not s.exists(f"{PREFIX}/MANIFEST.json") and not s.exists(f"{PREFIX}/shards/0-of-1/MANIFEST.json")


def topk_diff(rows: list[dict], model: Path, k: int, tie: float = 1e-3) -> tuple[float, int]:
    """(max relative |stored top-k log-prob − transformers'|, positions whose top-k ids differ) over
    all tokens; a position counts only when the k-th and (k+1)-th reference log-probs are more than
    ``tie`` apart (near-ties may order either way)."""
    b = load_backend(model, InferenceConfig(backend="hf"), dtype="float32")
    ref = b.score_topk([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows], k + 1)
    worst, differ = 0.0, 0
    for r, s in zip(rows, ref, strict=True):
        ids = np.asarray(r["teacher_topk_ids"]).reshape(-1, k)
        lps = np.asarray(r["teacher_topk_logprobs"], np.float32).reshape(-1, k)
        worst = max(worst, float((np.abs(lps - s.topk_logprobs[:, :k]) / np.maximum(1, -lps)).max()))
        clear = s.topk_logprobs[:, k - 1] - s.topk_logprobs[:, k] > tie
        differ += int((np.sort(ids, -1) != np.sort(s.topk_ids[:, :k], -1)).any(-1)[clear].sum())
        np.testing.assert_allclose(r["teacher_logprobs"], s.logprobs, atol=1e-3)
    return worst, differ


def test_precompute_stores_the_teacher_topk(models, tmp_path):
    """teacher_topk: k adds the teacher's top-k ids and log-probs (float16) of every response
    position, flattened [t, j], most likely first; the lineage records k."""
    from lopd.data.schemas import precompute_schema

    store = f"file://{tmp_path / 'store'}"
    run_stage(setup_run(store, models, tmp_path, n_prompts=4, teacher_topk=5))
    m, rows = read_output(store, precompute_schema(5))
    assert m.lineage["teacher_topk"] == 5 and len(rows) == 4
    check_rows(rows, {2})
    for r in rows:
        n = len(r["response_token_ids"])
        assert len(r["teacher_topk_ids"]) == len(r["teacher_topk_logprobs"]) == 5 * n
        lps = np.asarray(r["teacher_topk_logprobs"]).reshape(n, 5)
        assert (np.diff(lps, axis=-1) <= 0).all() and (lps <= 0).all()
    worst, differ = topk_diff(rows, models["teacher"], 5)
    assert worst <= 2 ** -10 and differ == 0, (worst, differ)  # float16 rounding only


def test_precompute_scores_with_the_torch_scorer(models, tmp_path):
    """precompute.scoring: {backend: torch} scores the teacher with plain forwards over packed
    batches (sampling stays on precompute.inference): the same log-probs and top-k as the
    transformers backend, and the lineage names the scoring backend."""
    from lopd.data.schemas import precompute_schema

    store = f"file://{tmp_path / 'store'}"
    run_stage(setup_run(store, models, tmp_path, n_prompts=4, teacher_topk=3,
                        scoring={"backend": "torch", "max_model_len": 256, "max_batch_tokens": 64}))
    m, rows = read_output(store, precompute_schema(3))
    assert m.lineage["scoring_backend"] == "torch" and len(rows) == 4
    check_rows(rows, {2})
    assert max_diff(rows, models["teacher"], "teacher_logprobs") <= 1e-5
    worst, differ = topk_diff(rows, models["teacher"], 3)
    assert worst <= 2 ** -10 and differ == 0, (worst, differ)


def test_precompute_refuses_the_torch_scorer_for_sampling(models, tmp_path):
    """The torch backend only scores: as the sampling engine it is a one-line recipe error."""
    from lopd.recipe import RecipeError, load_recipe

    path = setup_run(f"file://{tmp_path / 'store'}", models, tmp_path, inference={"backend": "torch"})
    with pytest.raises(RecipeError, match=r"precompute\.inference: .*backend torch only scores"):
        load_recipe(path)


# --------------------------------------------------------------------------- vLLM


@pytest.mark.slow
def test_precompute_on_vllm_matches_transformers(models, tmp_path):
    """The production path: vLLM samples (sampler log-probs via logprobs=0) and scores (prompt
    log-probs). In fp32 both must agree with transformers scoring the same tokens to 1e-3."""
    store = f"file://{tmp_path / 'store'}"
    r = setup_run(store, models, tmp_path, n_prompts=10,
                  inference={"backend": "vllm", "max_model_len": 256, "gpu_memory_utilization": 0.05,
                             "max_num_seqs": 16})
    lopd_cli("run", "precompute", "-r", str(r))
    m, rows = read_output(store)
    assert m.lineage["teacher_consistent"] is True and len(rows) == 10 and m.metrics["skipped_too_long"] == 1
    check_rows(rows, {2})
    assert "stop" in {r["finish_reason"] for r in rows}
    d_teacher = max_diff(rows, models["teacher"], "teacher_logprobs")
    d_sampler = max_diff(rows, models["student"], "rollout_logprobs")
    print(f"vllm vs transformers: teacher scoring max|diff|={d_teacher:.2e}, sampler max|diff|={d_sampler:.2e}")
    assert d_teacher <= 1e-3 and d_sampler <= 1e-3


@pytest.mark.slow
def test_precompute_topk_on_vllm_matches_transformers(models, tmp_path):
    """vLLM's top-k (``prompt_logprobs=k``, here k = 24 > vLLM's default cap of 20) equals the
    transformers backend's on the same tokens: the same ids, log-probs to float16 rounding."""
    from lopd.data.schemas import precompute_schema

    store = f"file://{tmp_path / 'store'}"
    r = setup_run(store, models, tmp_path, n_prompts=4, teacher_topk=24,
                  inference={"backend": "vllm", "max_model_len": 256, "gpu_memory_utilization": 0.05,
                             "max_num_seqs": 16})
    lopd_cli("run", "precompute", "-r", str(r))
    m, rows = read_output(store, precompute_schema(24))
    assert m.lineage["teacher_topk"] == 24 and len(rows) == 4
    worst, differ = topk_diff(rows, models["teacher"], 24)
    print(f"vllm vs transformers top-24: max relative |diff|={worst:.2e}, positions with other ids={differ}")
    assert worst <= 2e-3 and differ == 0

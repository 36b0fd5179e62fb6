"""Training data (lopd.train.data): bad precomputed data, each case a one-line TrainDataError naming
the row and column (also through the real entrypoint); parts verified against the manifest when
read; duplicated and empty data refused; and the deterministic global batch order."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from lopd.data.schemas import PRECOMPUTE, SFT_DATA, write_table
from lopd.layout import stage_prefix
from lopd.manifest import publish
from lopd.store import IntegrityError, file_digest, open_store
from lopd.train.data import TrainDataError, global_batch_indices, load_opd_samples, open_precompute
from lopd.train.sft_rows import load_sft_seqs
from tests.helpers.training import RUN, make_run, publish_precompute, run_job

GOOD = {"teacher_fingerprint": "t" * 64, "sft_teacher_fingerprint": "t" * 64, "teacher_consistent": True,
        "allow_inconsistent_teacher": False}


def _rows(n: int = 6) -> dict[str, list]:
    rng = np.random.default_rng(0)
    resp = [rng.integers(3, 300, 4).tolist() for _ in range(n)]
    return {"prompt_id": [f"p{i}" for i in range(n)], "sample_index": [0] * n,
            "prompt_token_ids": [[5, 6, 7]] * n, "response_token_ids": resp,
            "teacher_logprobs": [(-rng.random(4)).astype(np.float32).tolist() for _ in range(n)],
            "rollout_logprobs": [(-rng.random(4)).astype(np.float32).tolist() for _ in range(n)],
            "finish_reason": ["stop"] * n, "answer": [None] * n}


def _load(store_uri: str, allow: bool = False):
    store = open_store(store_uri)
    prefix = stage_prefix(RUN, "precompute")
    m, _ = open_precompute(store, prefix, allow)
    return load_opd_samples(store, prefix, m, max_seq_len=64, vocab_size=384)


def _bad(tmp_path, mutate, lineage=GOOD, shards=1, schema=PRECOMPUTE) -> str:
    rows = copy.deepcopy(_rows())
    mutate(rows)
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, rows, tmp_path, lineage, shards=shards, schema=schema)
    with pytest.raises(TrainDataError) as e:
        _load(uri)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_data_loads_in_a_shard_independent_order(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, _rows(), tmp_path, GOOD, shards=3)
    samples, skipped = _load(uri)
    assert [s.prompt_id for s in samples] == [f"p{i}" for i in range(6)] and skipped == 0
    assert samples[0].teacher_logprobs.dtype == np.float32


def test_length_mismatch_names_row_and_column(tmp_path):
    msg = _bad(tmp_path, lambda r: r["teacher_logprobs"].__setitem__(3, [-0.1, -0.2]))
    assert "row 3" in msg and "prompt_id='p3'" in msg and "teacher_logprobs" in msg and "length 2 != " in msg
    assert "part-00000.parquet" in msg


@pytest.mark.parametrize("value,what", [(float("nan"), "non-finite"), (float("inf"), "non-finite"),
                                        (-float("inf"), "non-finite"), (0.5, "positive log-prob")])
def test_nan_inf_and_positive_logprobs(tmp_path, value, what):
    def mutate(r):
        r["rollout_logprobs"][2][1] = value
    msg = _bad(tmp_path, mutate)
    assert "row 2" in msg and "column rollout_logprobs" in msg and what in msg and "token 1" in msg


def test_empty_response(tmp_path):
    def mutate(r):
        r["response_token_ids"][4] = []
        r["teacher_logprobs"][4] = []
        r["rollout_logprobs"][4] = []
    msg = _bad(tmp_path, mutate)
    assert "row 4" in msg and "column response_token_ids: empty response" in msg


def test_token_out_of_vocabulary(tmp_path):
    msg = _bad(tmp_path, lambda r: r["response_token_ids"][1].__setitem__(0, 99999))
    assert "row 1" in msg and "response_token_ids" in msg and "out of range" in msg


def test_missing_column(tmp_path):
    schema = pa.schema([f for f in PRECOMPUTE if f.name != "rollout_logprobs"])
    msg = _bad(tmp_path, lambda r: r.pop("rollout_logprobs"), schema=schema)
    assert "column 'rollout_logprobs' is missing" in msg


def test_finish_reason_is_loaded_and_optional(tmp_path):
    """Truncated rollouts ("length") load as they are, marked; data written without the column loads
    (finish_reason None); an unknown value names the column."""
    rows = _rows()
    rows["finish_reason"][1] = rows["finish_reason"][4] = "length"
    publish_precompute(f"file://{tmp_path / 'a'}", rows, tmp_path / "a", GOOD)
    samples, _ = _load(f"file://{tmp_path / 'a'}")
    assert [s.finish_reason for s in samples] == ["stop", "length", "stop", "stop", "length", "stop"]
    old = pa.schema([f for f in PRECOMPUTE if f.name != "finish_reason"])
    rows.pop("finish_reason")
    publish_precompute(f"file://{tmp_path / 'b'}", rows, tmp_path / "b", GOOD, schema=old)
    samples, _ = _load(f"file://{tmp_path / 'b'}")
    assert len(samples) == 6 and {s.finish_reason for s in samples} == {None}
    msg = _bad(tmp_path, lambda r: r["finish_reason"].__setitem__(2, "abort"))
    assert "row 2" in msg and "column finish_reason: 'abort'" in msg


def test_missing_manifest(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, _rows(), tmp_path, GOOD)
    open_store(uri).delete(f"{stage_prefix(RUN, 'precompute')}/MANIFEST.json")
    with pytest.raises(TrainDataError, match=r"precompute data: no manifest at .*runs/t/precompute/MANIFEST.json"):
        _load(uri)


def test_inconsistent_teacher_refused_unless_allowed(tmp_path):
    bad = {**GOOD, "teacher_consistent": False, "teacher_fingerprint": "a" * 64, "sft_teacher_fingerprint": "b" * 64}
    msg = _bad(tmp_path, lambda r: None, lineage=bad)
    assert "teacher_consistent is false" in msg and "a" * 64 in msg and "b" * 64 in msg
    assert "allow_inconsistent_teacher" in msg
    samples, _ = _load(f"file://{tmp_path / 'store'}", allow=True)
    assert len(samples) == 6


def test_cli_reports_one_line_and_publishes_nothing(tmp_path, request):
    """Through the real entrypoint: exit 2, one line on stderr, no opd output."""
    models = request.getfixturevalue("opd_models")
    rows = _rows()
    rows["teacher_logprobs"][5] = [-0.1, float("nan"), -0.2, -0.3]
    recipe, uri = make_run(tmp_path, models, rows, lineage=GOOD)
    proc = run_job("jobs.opd", recipe, check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "row 2" in err[0] and "teacher_logprobs" in err[0], proc.stderr[-2000:]
    assert open_store(uri).list(stage_prefix(RUN, "opd")) == []


def test_batches_are_deterministic_and_cover_epochs():
    a = global_batch_indices(10, 3, 4, seed=1)
    assert a == global_batch_indices(10, 3, 4, seed=1) and len(a) == 4
    first_epoch = sum((global_batch_indices(10, s, 5, seed=1) for s in range(2)), [])
    assert sorted(first_epoch) == list(range(10))


def test_a_part_rewritten_after_publishing_is_refused(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, _rows(), tmp_path, GOOD, shards=2)
    rows = _rows()
    rows["teacher_logprobs"] = [[-0.5] * 4 for _ in range(6)]  # valid data, but not what was published
    part = tmp_path / "store" / stage_prefix(RUN, "precompute") / "shards/1-of-2/part-00000.parquet"
    write_table(pa.table({k: pa.array(v[1::2], type=PRECOMPUTE.field(k).type) for k, v in rows.items()}),
                part, PRECOMPUTE)
    with pytest.raises(IntegrityError) as e:
        _load(uri)
    msg = str(e.value)
    assert "\n" not in msg and "shards/1-of-2/part-00000.parquet" in msg and file_digest(part) in msg


def test_duplicate_rows_name_both(tmp_path):
    def mutate(r):
        for k in r:
            r[k][3] = copy.deepcopy(r[k][0])  # p0 sample 0 again, in the other shard
    rows = copy.deepcopy(_rows())
    mutate(rows)
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, rows, tmp_path, GOOD, shards=3)
    with pytest.raises(TrainDataError) as e:
        _load(uri)
    msg = str(e.value)
    assert "\n" not in msg and "duplicate (prompt_id, sample_index) ('p0', 0)" in msg
    assert "shards/0-of-3/part-00000.parquet: row 0 and " in msg and "shards/0-of-3/part-00000.parquet: row 1" in msg


def _publish_table(uri: str, tmp, stage: str, table: pa.Table, schema, **fields) -> None:
    local = tmp / f"{stage}-out"
    (local / "shards/0-of-1").mkdir(parents=True)
    write_table(table, local / "shards/0-of-1/part-00000.parquet", schema)
    publish(open_store(uri), stage_prefix(RUN, stage), local, stage=stage, run_id=RUN, **fields)


def test_empty_precompute_data_is_refused(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    _publish_table(uri, tmp_path, "precompute", PRECOMPUTE.empty_table(), PRECOMPUTE, lineage=GOOD)
    with pytest.raises(TrainDataError, match=r"runs/t/precompute: the published precompute data holds no rows$"):
        _load(uri)


def _sft_table(ids: list[str]) -> pa.Table:
    convs = [[{"role": "user", "content": "Compute 1+1."}, {"role": "assistant", "content": "2"}] for _ in ids]
    return pa.table({"prompt_id": ids, "messages": convs, "num_tokens": [1] * len(ids),
                     "finish_reason": ["stop"] * len(ids)}, schema=SFT_DATA)


def test_sft_data_duplicates_and_empty_are_refused(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prefix = stage_prefix(RUN, "sft-data")
    uri = f"file://{tmp_path / 'a'}"
    _publish_table(uri, tmp_path / "a", "sft-data", _sft_table(["s0", "s1", "s0"]), SFT_DATA,
                   metrics={"prompts": 3, "skipped_too_long": 0, "samples": 3})
    with pytest.raises(TrainDataError) as e:
        load_sft_seqs(open_store(uri), prefix, tok, 64)
    msg = str(e.value)
    assert "\n" not in msg and "duplicate prompt_id 's0'" in msg and "part-00000.parquet: row 0 and " in msg
    assert msg.endswith("part-00000.parquet: row 2")
    # two samples per prompt (teacher sampling n=2) are not duplicates; a third is
    uri = f"file://{tmp_path / 'b'}"
    _publish_table(uri, tmp_path / "b", "sft-data", _sft_table(["s0", "s0", "s1", "s1"]), SFT_DATA,
                   metrics={"prompts": 2, "skipped_too_long": 0, "samples": 4})
    seqs, _, _, _ = load_sft_seqs(open_store(uri), prefix, tok, 64)
    assert len(seqs) == 4
    uri = f"file://{tmp_path / 'c'}"
    _publish_table(uri, tmp_path / "c", "sft-data", _sft_table([]), SFT_DATA,
                   metrics={"prompts": 2, "skipped_too_long": 2, "samples": 0})
    with pytest.raises(TrainDataError, match="runs/t/sft-data: the published SFT data holds no rows$"):
        load_sft_seqs(open_store(uri), prefix, tok, 64)


# --------------------------------------------------------------------------- the teacher's top-k

TOPK = 3


def _topk_rows(n: int = 6) -> dict[str, list]:
    rows = _rows(n)
    rng = np.random.default_rng(1)
    rows["teacher_topk_ids"] = [rng.integers(0, 384, 4 * TOPK).tolist() for _ in range(n)]
    rows["teacher_topk_logprobs"] = [np.sort(-rng.random(4 * TOPK)).astype(np.float16).tolist() for _ in range(n)]
    return rows


def test_topk_columns_load_and_reach_micro_batches(tmp_path):
    from lopd.data.schemas import precompute_schema
    from lopd.train.packing import make_micro_batches

    uri = f"file://{tmp_path / 'store'}"
    rows = _topk_rows()
    publish_precompute(uri, rows, tmp_path, {**GOOD, "teacher_topk": TOPK}, shards=2, schema=precompute_schema(TOPK))
    samples, _ = _load(uri)
    s = samples[2]
    assert s.teacher_topk_ids.shape == (4, TOPK) and s.teacher_topk_logprobs.dtype == np.float16
    np.testing.assert_array_equal(s.teacher_topk_ids.reshape(-1), rows["teacher_topk_ids"][2])
    mbs = make_micro_batches([x.to_seq(i) for i, x in enumerate(samples)], 16)
    assert sum(mb.num_targets for mb in mbs) == 24
    for mb in mbs:
        assert mb.extras["teacher_topk_ids"].shape == (mb.num_targets, TOPK)
        assert mb.extras["teacher_topk_logprobs"].shape == (mb.num_targets, TOPK)
        assert mb.extras["teacher_topk_ids"].dtype == torch.int64
        i = int(mb.seq_index[0])
        np.testing.assert_allclose(mb.extras["teacher_topk_logprobs"][:4].numpy(),
                                   samples[i].teacher_topk_logprobs.astype(np.float32))
    # data without the columns (teacher_topk 0 or missing in the lineage) loads without them
    publish_precompute(f"file://{tmp_path / 'old'}", _rows(), tmp_path / "o", GOOD)
    old, _ = _load(f"file://{tmp_path / 'old'}")
    assert old[0].teacher_topk_ids is None and "teacher_topk_ids" not in old[0].to_seq(0).extras


@pytest.mark.parametrize("case,match", [
    ("length", r"row 1 .*column teacher_topk_ids: length 11 != response length 4 x teacher_topk 3"),
    ("vocab", r"row 1 .*column teacher_topk_ids: token id out of range \[0, 384\)"),
    ("positive", r"row 1 .*column teacher_topk_logprobs: a value is not a finite log-prob <= 0"),
])
def test_topk_bad_columns_name_row_and_column(tmp_path, case, match):
    from lopd.data.schemas import precompute_schema

    def mutate(r):
        if case == "length":
            r["teacher_topk_ids"][1] = r["teacher_topk_ids"][1][:11]
        elif case == "vocab":
            r["teacher_topk_ids"][1][5] = 384
        else:
            r["teacher_topk_logprobs"][1][0] = 0.5

    rows = _topk_rows()
    mutate(rows)
    uri = f"file://{tmp_path / 'store'}"
    publish_precompute(uri, rows, tmp_path, {**GOOD, "teacher_topk": TOPK}, shards=1, schema=precompute_schema(TOPK))
    with pytest.raises(TrainDataError, match=match):
        _load(uri)


def test_topk_objective_needs_topk_data():
    from lopd.train.data import require_topk

    assert require_topk({"teacher_topk": 5}, "x") == 5
    for lineage in ({}, {"teacher_topk": 0}):
        with pytest.raises(TrainDataError, match="x: opd.objective topk needs the teacher's top-k"):
            require_topk(lineage, "x")

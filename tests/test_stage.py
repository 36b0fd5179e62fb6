"""The stage harness (lopd.stage): arguments, shards and the published no-op, per-prompt seeds,
--force never reaching outside the store, and a stage with no output rows publishing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from lopd import LopdError
from lopd.data.schemas import SFT_DATA
from lopd.layout import MANIFEST
from lopd.stage import EmptyOutputError, StageError, entrypoint, prompt_seed, start


def test_prompt_seed_is_stable_and_spread():
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, f"p{i}") for i in range(100)}) == 100
    assert prompt_seed(0, "a") != prompt_seed(1, "a")


def write_recipe(path: Path, store: str, teacher: Path, prompts: Path, **extra) -> Path:
    import yaml

    data = {"run_id": "t", "store": store, "models": {"teacher": {"uri": str(teacher)},
                                                       "student": {"uri": str(teacher)}},
            "sft_data": {"prompts": str(prompts), "shards": 3, "inference": {"backend": "hf"}}}
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_args_shards_and_noop(tmp_path, tiny_model, monkeypatch):
    r = write_recipe(tmp_path / "r.yaml", str(tmp_path / "store"), tiny_model, tmp_path / "p.jsonl")
    ctx = start("sft-data", ["--recipe", str(r)])
    assert (ctx.shard_index, ctx.num_shards) == (0, 3) and ctx.shard == "runs/t/sft-data/shards/0-of-3"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    ctx = start("sft-data", ["--recipe", str(r), "--set", "sft_data.part_size=7"])
    assert ctx.shard_index == 2 and ctx.section.part_size == 7
    with pytest.raises(StageError, match=r"--shard-index 2 out of range for --num-shards 2 \(0..1\)"):
        start("sft-data", ["--recipe", str(r), "--num-shards", "2"])
    with pytest.raises(StageError, match="recipe has no 'precompute' section"):
        start("precompute", ["--recipe", str(r)])
    # a published stage is a no-op unless --force, which removes the stage manifest first
    (tmp_path / "store/runs/t/sft-data").mkdir(parents=True)
    (tmp_path / "store/runs/t/sft-data/MANIFEST.json").write_text("{}")
    assert start("sft-data", ["--recipe", str(r)]) is None
    assert start("sft-data", ["--recipe", str(r), "--force"]) is not None
    assert not (tmp_path / "store/runs/t/sft-data/MANIFEST.json").exists()
    with pytest.raises(LopdError):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", "x")
        start("sft-data", ["--recipe", str(r)])


def test_force_never_deletes_outside_the_store(tmp_path, tiny_model):
    outside = tmp_path / "outside"
    (outside / "shards/0-of-3").mkdir(parents=True)
    for p in ("sentinel", "MANIFEST.json", "shards/0-of-3/sentinel"):
        (outside / p).write_text("keep")
    store = tmp_path / "store"
    r = write_recipe(tmp_path / "r.yaml", str(store), tiny_model, tmp_path / "p.jsonl")
    # a shard directory that is a symlink out of the store: --force removes the link only
    (store / "runs/t/sft-data/shards").mkdir(parents=True)
    (store / "runs/t/sft-data/shards/0-of-3").symlink_to(outside / "shards/0-of-3")
    assert start("sft-data", ["--recipe", str(r), "--force"]) is not None
    assert not (store / "runs/t/sft-data/shards/0-of-3").is_symlink()
    assert (outside / "shards/0-of-3/sentinel").read_text() == "keep"
    # a stage directory that resolves outside the store: refused in one line, with or without --force
    shutil.rmtree(store / "runs/t/sft-data")
    (store / "runs/t/sft-data").symlink_to(outside)
    for argv in (["--force"], []):
        with pytest.raises(LopdError, match=r"runs/t/sft-data resolves to .*outside, outside the store root") as e:
            start("sft-data", ["--recipe", str(r), *argv])
        assert "\n" not in str(e.value)
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*") if p.is_file()) == [
        "MANIFEST.json", "sentinel", "shards/0-of-3/sentinel"]


def _empty_part(part, _i):
    return pa.table({k: [] for k in SFT_DATA.names}, schema=SFT_DATA), {"prompts": len(part), "skipped_too_long":
                                                                          len(part), "samples": 0}


def test_a_stage_that_produces_no_rows_publishes_nothing(tmp_path, tiny_model):
    store = tmp_path / "store"
    r = write_recipe(tmp_path / "r.yaml", str(store), tiny_model, tmp_path / "p.jsonl")
    for shards in (1, 2):
        ctx = None
        for i in range(shards):
            ctx = start("sft-data", ["--recipe", str(r), "--num-shards", str(shards), "--shard-index", str(i),
                                     "--force"])
            parts = ctx.run_parts(["a", "b", "c"], 2, _empty_part, key=str, schema=SFT_DATA)
            assert [p.rows for p in parts] == [0, 0]
            if i + 1 < shards:  # an empty shard alone is fine; the stage is refused when all are in
                assert ctx.publish(parts, inputs={}, lineage={}) is None
        with pytest.raises(EmptyOutputError) as e:
            ctx.publish(parts, inputs={}, lineage={})
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("sft-data produced no rows") and "skipped_too_long=" in msg
        assert "nothing published" in msg
        assert not (store / "runs/t/sft-data/MANIFEST.json").exists()
    assert not (store / f"runs/t/sft-data/shards/0-of-1/{MANIFEST}").exists()


def test_sft_data_with_every_prompt_skipped_fails_in_one_line(tmp_path, tiny_model, capsys):
    """Through the real entrypoint: every prompt is longer than the context, so exit 2 and no manifest."""
    import jobs.sft_data

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"q{i}", "prompt": "many words " * 20}) + "\n"
                               for i in range(3)))
    r = write_recipe(tmp_path / "r.yaml", str(tmp_path / "store"), tiny_model, prompts)
    with pytest.raises(SystemExit) as e:
        entrypoint(jobs.sft_data.main, ["--recipe", str(r), "--num-shards", "1",
                                        "--set", "sft_data.inference.max_model_len=8"])
    assert e.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: sft-data produced no rows") and "skipped_too_long=3" in err[0]
    assert "Traceback" not in stderr
    assert not list((tmp_path / "store").rglob(MANIFEST))

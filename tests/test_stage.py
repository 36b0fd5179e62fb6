"""The stage harness (lopd.stage): arguments, shards and the published no-op, and per-prompt seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lopd import LopdError
from lopd.stage import StageError, prompt_seed, start


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

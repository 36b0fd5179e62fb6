"""Stage sft-data (transformers backend here; vLLM is covered in test_precompute.py): output,
lineage, sharding, bad input, and resume after SIGKILL at random points."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lopd import LopdError
from lopd.data.schemas import SFT_DATA
from lopd.fingerprint import fingerprint
from lopd.manifest import ManifestError, read_manifest
from lopd.store import open_store
from tests.helpers.cli import REPO, lopd_cli
from tests.helpers.inference import write_prompts
from tests.helpers.prompts import write_non_utf8_jsonl, write_truncated_parquet

RUN = "sd"


def sft_recipe(path: Path, store: str, teacher: Path, prompts: Path, **section) -> Path:
    sec = {"prompts": str(prompts), "part_size": 3, "shards": 1,
           "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 12, "seed": 0},
           "inference": {"backend": "hf", "max_model_len": 256}}
    sec.update(section)
    path.write_text(yaml.safe_dump({"run_id": RUN, "store": store, "models": {
        "teacher": {"uri": str(teacher)}, "student": {"uri": str(teacher)}}, "sft_data": sec}))
    return path


def run_stage(recipe: Path, *args: str) -> None:
    from jobs.sft_data import main

    main(["--recipe", str(recipe), *args])


def stage_rows(store_uri: str) -> tuple[list[tuple[str, str]], list[dict]]:
    """(file path, digest) of the published stage and its rows, via the verified manifest."""
    store = open_store(store_uri)
    m, _ = read_manifest(store, f"runs/{RUN}/sft-data", verify=True)
    rows = []
    for f in m.files:
        t = pq.read_table(store.fetch(f"runs/{RUN}/sft-data/{f.path}", f.digest, f.bytes))
        assert t.schema.equals(SFT_DATA, check_metadata=False)
        rows += t.to_pylist()
    return [(f.path, f.digest) for f in m.files], rows


def test_sft_data_two_shards_lineage_and_skips(store_uri, tiny_model, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 7, long_ids=("zz-long",))
    r = sft_recipe(tmp_path / "r.yaml", store_uri, tiny_model, prompts, shards=2,
                   sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 12, "seed": 0, "n": 2})
    run_stage(r, "--shard-index", "1")
    store = open_store(store_uri)
    with pytest.raises(ManifestError):  # one shard of two: no stage output yet
        read_manifest(store, f"runs/{RUN}/sft-data")
    run_stage(r, "--shard-index", "0")
    files, rows = stage_rows(store_uri)
    m, _ = read_manifest(store, f"runs/{RUN}/sft-data")
    assert m.lineage["teacher_fingerprint"] == fingerprint(str(tiny_model))
    from transformers import AutoTokenizer

    from lopd.data.chat import chat_rendering

    # how the teacher's template renders (what sft checks the student against), and with what thinking
    assert m.lineage["enable_thinking"] is None
    assert m.lineage["chat_rendering"] == chat_rendering(AutoTokenizer.from_pretrained(tiny_model))
    assert m.metrics["prompts"] == 8 and m.metrics["skipped_too_long"] == 1 and m.metrics["samples"] == 14
    assert sorted({r["prompt_id"] for r in rows}) == [f"p{i:03d}" for i in range(7)]
    for row in rows:
        assert [x["role"] for x in row["messages"]] == ["user", "assistant"]
        assert 0 < row["num_tokens"] <= 12 and row["finish_reason"] in ("stop", "length")
    assert m.metrics["response_tokens"] == sum(r["num_tokens"] for r in rows)
    assert {p for p, _ in files} == {"shards/0-of-2/part-00000.parquet", "shards/0-of-2/part-00001.parquet",
                                     "shards/1-of-2/part-00000.parquet", "shards/1-of-2/part-00001.parquet"}
    # re-running is a no-op (nothing rewritten); --force redoes the shard with identical data
    before = store.read_bytes(f"runs/{RUN}/sft-data/MANIFEST.json")
    run_stage(r, "--shard-index", "0")
    assert store.read_bytes(f"runs/{RUN}/sft-data/MANIFEST.json") == before
    run_stage(r, "--shard-index", "0", "--force")
    assert stage_rows(store_uri)[0] == files


def bad_prompts(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.jsonl"
    rows = {"missing": [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "question": "y"}],
            "empty": [{"prompt_id": "a", "messages": [{"role": "user", "content": "  "}]}]}[kind]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing.jsonl: row 1: missing column 'messages' \(or 'prompt'\)"),
    ("empty", r"empty.jsonl: row 0: empty prompt"),
    ("no-model", r"^models.teacher.uri: model '/nonexistent/teacher' not found"),
    ("shard", r"--shard-index 5 out of range for --num-shards 2"),
    ("no-file", r"prompt file not found: .*nope.jsonl"),
])
def test_sft_data_bad_input_one_error_nothing_published(case, match, tiny_model, tmp_path):
    store = tmp_path / "store"
    prompts = {"missing": bad_prompts(tmp_path, "missing"), "empty": bad_prompts(tmp_path, "empty"),
               "no-file": tmp_path / "nope.jsonl"}.get(case, write_prompts(tmp_path / "p.jsonl", 3))
    teacher = Path("/nonexistent/teacher") if case == "no-model" else tiny_model
    r = sft_recipe(tmp_path / "r.yaml", str(store), teacher, prompts, shards=2)
    args = ["--shard-index", "5"] if case == "shard" else []
    with pytest.raises(LopdError, match=match):
        run_stage(r, *args)
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


def test_sft_data_cli_error_is_one_line(tiny_model, tmp_path):
    r = sft_recipe(tmp_path / "r.yaml", str(tmp_path / "store"), tiny_model, bad_prompts(tmp_path, "missing"))
    proc = lopd_cli("run", "sft-data", "-r", str(r), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert "row 1: missing column 'messages'" in proc.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sft_data_damaged_prompts_exit_2_before_model_load(kind, tiny_model, tmp_path):
    """A non-UTF-8 JSONL or truncated parquet prompts file: the entrypoint prints one ``error:``
    line naming the file (and the line) and exits 2, before any model is loaded."""
    prompts = (write_non_utf8_jsonl(tmp_path / "p.jsonl") if kind == "jsonl"
               else write_truncated_parquet(tmp_path / "p.parquet"))
    r = sft_recipe(tmp_path / "r.yaml", str(tmp_path / "store"), tiny_model, prompts)
    proc = subprocess.run([sys.executable, "-m", "jobs.sft_data", "--recipe", str(r)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    want = (f"error: {prompts}: line 2: not UTF-8 text" if kind == "jsonl"
            else f"error: {prompts}: not a readable parquet file (")
    assert errors[0].startswith(want), errors[0]
    assert not (tmp_path / "store").exists() or not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


# --------------------------------------------------------------------------- kill and resume


def spawn(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "jobs.sft_data", "--recipe", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sft_data_resumes_after_random_kills(tiny_model, tmp_path):
    """SIGKILL the stage at >= 5 random points (during start-up and model load, mid-part, between
    a part's parquet and its marker); each restart resumes from the last complete part; no
    manifest appears early; the final output is byte-identical to an uninterrupted run's."""
    prompts = write_prompts(tmp_path / "p.jsonl", 27)
    ref = sft_recipe(tmp_path / "ref.yaml", f"file://{tmp_path / 'ref'}", tiny_model, prompts, part_size=2)
    run_stage(ref)  # the uninterrupted run (in-process)
    want_files, want_rows = stage_rows(f"file://{tmp_path / 'ref'}")
    n_parts = len(want_files)
    assert n_parts == 14

    r = sft_recipe(tmp_path / "r.yaml", f"file://{tmp_path / 'kill'}", tiny_model, prompts, part_size=2)
    shard = tmp_path / f"kill/runs/{RUN}/sft-data/shards/0-of-1"
    markers = lambda: len(list((shard / "parts").glob("*.json"))) if shard.exists() else 0  # noqa: E731
    rng = random.Random(1234)
    done_at_kill = []
    for mode in ["startup", "work", "work", "startup", "work"]:
        proc = spawn(r)
        t0, target = time.time(), markers() + (mode == "work")
        while proc.poll() is None and markers() < target and time.time() - t0 < 120:
            time.sleep(0.005)
        # start-up: anywhere in imports / model load; work: just after a part, i.e. inside the next
        # part's generation or between its parquet upload and its marker
        time.sleep(rng.uniform(0.3, 2.5) if mode == "startup" else rng.uniform(0.0, 0.08))
        assert proc.poll() is None, f"finished before kill {len(done_at_kill) + 1}: {proc.stderr.read()[-500:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_at_kill.append(markers())
        # consumers never see a partial shard or stage
        assert not (shard / "MANIFEST.json").exists()
        with pytest.raises(ManifestError):
            read_manifest(open_store(f"file://{tmp_path / 'kill'}"), f"runs/{RUN}/sft-data")
    print("parts done at each kill:", done_at_kill)
    assert done_at_kill == sorted(done_at_kill) and 0 < done_at_kill[-1] < n_parts  # progress kept across kills
    proc = spawn(r)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    resumed = [json.loads(x) for x in err.splitlines() if x.startswith("{") and '"part_done"' in x]
    assert sum(e["resumed"] for e in resumed) == done_at_kill[-1]  # it did not start from zero
    got_files, got_rows = stage_rows(f"file://{tmp_path / 'kill'}")
    assert got_files == want_files and got_rows == want_rows

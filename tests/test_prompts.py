"""Prompt files (lopd.data.prompts): undecodable, truncated and unusable inputs are one-line errors
naming the file (and the line, for JSONL)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lopd.data.prompts import PromptDataError, load_prompts
from tests.helpers.prompts import write_non_utf8_jsonl, write_truncated_parquet


def _refused(path: Path, match: str) -> str:
    t0 = time.perf_counter()
    with pytest.raises(PromptDataError, match=match) as exc:
        load_prompts(str(path))
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    p = write_non_utf8_jsonl(tmp_path / "p.jsonl")
    msg = _refused(p, r"p.jsonl: line 2: not UTF-8 text \(byte 34 of the line\)")
    assert msg == f"{p}: line 2: not UTF-8 text (byte 34 of the line)"


def test_truncated_parquet_names_file(tmp_path):
    p = write_truncated_parquet(tmp_path / "p.parquet")
    _refused(p, r"^" + str(p) + r": not a readable parquet file \(")
    (tmp_path / "empty.parquet").write_bytes(b"")
    _refused(tmp_path / "empty.parquet", r"empty.parquet: not a readable parquet file")


def test_unusable_json_lines_name_the_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "b", "prompt": ' + "[" * 100_000 + "\n")
    _refused(p, r"p.jsonl: line 2: not usable JSON \(nested too deeply\)")
    p.write_text('{"prompt_id": 1' + "0" * 5000 + ', "prompt": "x"}\n')
    _refused(p, r"p.jsonl: line 1: not usable JSON \(Exceeds the limit")


def test_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt_id": "a", "prompt": "x"}).encode() + b"\n")
    assert [q.prompt_id for q in load_prompts(str(p))] == ["a"]


def test_parquet_rows_stream_in_batches_and_keep_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lopd.data.prompts import iter_rows

    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(2500)], "prompt": ["x"] * 2500}), p,
                   row_group_size=700)
    rows = iter_rows(p)
    assert next(rows) == {"prompt_id": "p0", "prompt": "x"}
    assert [q.prompt_id for q in load_prompts(str(p))] == [f"p{i}" for i in range(2500)]

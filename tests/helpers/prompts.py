"""Damaged prompt files: undecodable JSONL and truncated parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_truncated_parquet(path: Path) -> Path:
    """A prompts parquet file cut in half (as by an interrupted copy)."""
    full = path.with_name(path.stem + "-full.parquet")
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(200)], "prompt": ["Compute 1+2."] * 200}), full)
    data = full.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def write_non_utf8_jsonl(path: Path) -> Path:
    """A JSONL prompts file whose second line holds Latin-1 bytes."""
    path.write_bytes(json.dumps({"prompt_id": "a", "prompt": "x"}).encode() + b"\n"
                     + b'{"prompt_id": "b", "prompt": "caf\xe9"}\n')
    return path

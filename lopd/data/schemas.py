"""Parquet schemas of the data contracts in docs/architecture.md (written with zstd compression).

Every stage writes with these schemas and every reader checks them, so a column that is
missing or of the wrong type is an error naming the file and the column.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS = pa.schema([
    ("prompt_id", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("answer", pa.string()),  # nullable
])

SFT_DATA = pa.schema([
    ("prompt_id", pa.string()),
    ("messages", pa.list_(MESSAGE)),  # the prompt turns plus the teacher's assistant turn
    ("num_tokens", pa.int32()),  # response tokens
    ("finish_reason", pa.string()),  # "stop" | "length"
])

PRECOMPUTE = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),
    ("teacher_logprobs", pa.list_(pa.float32())),
    ("rollout_logprobs", pa.list_(pa.float32())),  # the SFT student's own, when sampling
    ("finish_reason", pa.string()),
    ("answer", pa.string()),  # nullable
])

TOPK_LOGPROB_TYPE = pa.float16()
"""Storage type of ``teacher_topk_logprobs`` (docs/architecture.md: half the bytes of float32 for
a rounding of at most 2^-11 relative to the log-prob)."""

TOPK_COLUMNS = pa.schema([
    ("teacher_topk_ids", pa.list_(pa.int32())),  # [len(response) * k], row-major [t, j]
    ("teacher_topk_logprobs", pa.list_(TOPK_LOGPROB_TYPE)),  # aligned with the ids, descending per token
])


def precompute_schema(teacher_topk: int = 0) -> pa.Schema:
    """PRECOMPUTE, plus the two top-k columns when the teacher's top-k is stored (``teacher_topk > 0``)."""
    return pa.schema([*PRECOMPUTE, *TOPK_COLUMNS]) if teacher_topk > 0 else PRECOMPUTE


EVAL = pa.schema([
    ("benchmark", pa.string()),
    ("problem_id", pa.string()),
    ("sample_index", pa.int32()),
    ("response", pa.string()),
    ("extracted", pa.string()),  # nullable: nothing extracted
    ("correct", pa.bool_()),
    ("num_tokens", pa.int32()),
])

# The rows an ``eval`` stage writes: EVAL plus the checkpoint's label, the backend's finish reason
# ("stop" | "length") and the grader's verdict.
EVAL_RECORD = pa.schema([*EVAL, pa.field("checkpoint", pa.string()), pa.field("finish_reason", pa.string()),
                         pa.field("verdict", pa.string())])

PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3}


def write_table(table: pa.Table, path, schema: pa.Schema) -> None:
    """Write ``table`` cast to ``schema`` with the project's parquet options."""
    import pyarrow.parquet as pq

    pq.write_table(table.select(schema.names).cast(schema), str(path), **PARQUET_OPTIONS)

"""Load prompt datasets (JSONL or parquet; a path or a store URI) into :class:`Prompt` rows.

Rows carry ``prompt_id``, either ``messages`` (a list of ``{role, content}``) or ``prompt``
(a string, becoming one user message), and an optional ``answer``. Errors name the file,
the row and the field. :mod:`lopd.data.convert` (``lopd prompts convert``) writes such files from
Hugging Face dataset files.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopd import LopdError


class PromptDataError(LopdError):
    """A prompt file that cannot be used; the message names the file, row and field."""


@dataclass
class Prompt:
    prompt_id: str
    messages: list[dict[str, str]]
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_rows(path: Path, error: type[LopdError] = PromptDataError, label: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSONL or parquet file; problems raise ``error`` naming ``label`` (default: the path)."""
    return list(iter_rows(path, error, label))


def iter_rows(path: Path, error: type[LopdError] = PromptDataError, label: str | None = None) -> Iterator[Any]:
    """Stream the rows of a local JSONL or parquet file (parquet in record batches, JSONL line by
    line), raising ``error`` as :func:`read_rows` does."""
    where = label or str(path)
    if path.suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path, where, error)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, where, error)
    else:
        raise error(f"{where}: unsupported file type (use .jsonl or .parquet)")


def _parquet_rows(path: Path, where: str, error: type[LopdError]) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:  # truncated or not parquet at all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{where}: not a readable parquet file ({reason})") from None


def _jsonl_rows(path: Path, where: str, error: type[LopdError]) -> Iterator[Any]:
    """One JSON value per non-blank line of a UTF-8 file (a leading byte-order mark is allowed)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{where}: line {i + 1}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: line {i + 1}: not valid JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # an integer too long to convert; nesting too deep
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
                raise error(f"{where}: line {i + 1}: not usable JSON ({reason})") from None
            yield row


def local_path(uri: str) -> Path:
    """A local path for ``uri``: a path or ``file://`` URI as is; another store URI downloaded to a temp dir."""
    from lopd.store import is_store_uri, open_store

    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if is_store_uri(uri):
        parent, _, name = uri.rpartition("/")
        tmp = Path(tempfile.mkdtemp(prefix="lopd-prompts-")) / name
        open_store(parent).get_file(name, tmp)
        return tmp
    return Path(uri)


def load_prompts(uri: str, answer_field: str = "answer") -> list[Prompt]:
    """Read and validate a prompt dataset; duplicate or empty ids and empty prompts are errors."""
    path = local_path(uri)
    if not path.is_file():
        raise PromptDataError(f"prompt file not found: {uri}")
    out: list[Prompt] = []
    seen: set[str] = set()
    for i, row in enumerate(read_rows(path, label=uri)):
        where = f"{uri}: row {i}"
        if not isinstance(row, dict):
            raise PromptDataError(f"{where}: expected an object")
        pid = row.get("prompt_id")
        if pid is None or str(pid) == "":
            raise PromptDataError(f"{where}: missing column 'prompt_id'")
        pid = str(pid)
        if pid in seen:
            raise PromptDataError(f"{where}: duplicate prompt_id {pid!r}")
        seen.add(pid)
        if row.get("messages") is not None:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                    for m in msgs):
                raise PromptDataError(f"{where}: 'messages' must be a list of {{role, content}}")
            msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        elif row.get("prompt") is not None:
            msgs = [{"role": "user", "content": str(row["prompt"])}]
        else:
            raise PromptDataError(f"{where}: missing column 'messages' (or 'prompt')")
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise PromptDataError(f"{where}: empty prompt")
        ans = row.get(answer_field)
        extra = {k: v for k, v in row.items() if k not in ("prompt_id", "messages", "prompt", answer_field)}
        out.append(Prompt(pid, msgs, None if ans is None else str(ans), extra))
    if not out:
        raise PromptDataError(f"{uri}: no prompts")
    return out


def shard_of(items: list, index: int, count: int) -> list:
    """Contiguous shard ``index`` of ``count`` (stable: the same input always splits the same)."""
    if count < 1 or not 0 <= index < count:
        raise LopdError(f"shard index {index} out of range for {count} shards (0..{count - 1})")
    n = len(items)
    lo, hi = n * index // count, n * (index + 1) // count
    return items[lo:hi]

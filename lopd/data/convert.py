"""Convert Hugging Face dataset files into lopd prompt files (:mod:`lopd.data.prompts`).

Inputs are the files the hub serves (parquet, or JSONL), read row by row:

- ``openthoughts3`` (``open-thoughts/OpenThoughts3-1.2M``): ``conversations`` is a list of
  ``{from, value}`` turns (``human`` / ``gpt``); the prompt is every turn before the answer.
  The dataset has no id column: a row's id is ``ot3-<row>`` (its position in the inputs).
- ``dapo-math`` (``BytedTsinghua-SIA/DAPO-Math-17k``, and its JSONL copies): ``prompt`` is a chat
  list ``[{role, content}]``, the answer is ``reward_model.ground_truth`` (or ``label``); the id is
  ``extra_info.index`` when there is one, else ``dapo-<row>``. Its parquet repeats every prompt
  many times: repeats are dropped unless ``dedupe=False``.
- ``chat``: any dataset with a ``messages`` or ``prompt`` column (a chat list or a string), an
  optional ``prompt_id``/``id`` and an optional ``answer`` / ``reward_model.ground_truth`` /
  ``label``.

``auto`` picks the dataset from the first row's columns. Trailing assistant turns (the
dataset's own answer) are removed from every prompt. The output (``.jsonl`` or ``.parquet``)
is written under a temporary name, loaded back with :func:`~lopd.data.prompts.load_prompts`,
and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd.data.prompts import PromptDataError, iter_rows, load_prompts, local_path

DATASETS = ("auto", "openthoughts3", "dapo-math", "chat")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
CHAT_ROLES = ("system", "user", "assistant")


class ConvertError(PromptDataError):
    """A dataset file that cannot be converted; the message names the file, row and field."""


@dataclass
class Converted:
    """What a conversion wrote."""

    out: Path
    dataset: str
    rows: int
    prompts: int
    duplicates: int


Row = dict[str, Any]


def detect(row: Any, where: str) -> str:
    """The dataset a row looks like (``openthoughts3``, ``dapo-math`` or ``chat``)."""
    if not isinstance(row, dict):
        raise ConvertError(f"{where}: expected an object")
    if "conversations" in row:
        return "openthoughts3"
    if isinstance(row.get("prompt"), list) and ("reward_model" in row or "label" in row):
        return "dapo-math"
    if "messages" in row or "prompt" in row:
        return "chat"
    cols = ", ".join(sorted(map(str, row))) or "none"
    raise ConvertError(f"{where}: no 'conversations', 'messages' or 'prompt' column (columns: {cols}); "
                       "not a dataset lopd can convert")


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ConvertError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")
    return value


def _strip_answer(msgs: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or not any(m["content"].strip() for m in msgs):
        raise ConvertError(f"{where}: field '{field}': empty prompt")
    return msgs


def sharegpt_messages(turns: Any, where: str, field: str = "conversations") -> list[dict[str, str]]:
    """``[{from, value}]`` turns → chat messages, without the trailing answer."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ConvertError(f"{where}: field '{field}': expected a list of {{from, value}}")
    msgs = []
    for j, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(t.get("from", t.get("role"))))
        if role is None:
            raise ConvertError(f"{where}: field '{field}[{j}].from': unknown speaker {t.get('from')!r} "
                               f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        msgs.append({"role": role, "content": _text(t.get("value", t.get("content")), where, f"{field}[{j}].value")})
    return _strip_answer(msgs, where, field)


def chat_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A chat list ``[{role, content}]`` or a string (one user turn) → messages, without the answer."""
    if isinstance(value, str):
        return _strip_answer([{"role": "user", "content": value}], where, field)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ConvertError(f"{where}: field '{field}': expected a string or a list of {{role, content}}")
    msgs = []
    for j, m in enumerate(value):
        if m.get("role") not in CHAT_ROLES:
            raise ConvertError(f"{where}: field '{field}[{j}].role': expected one of {', '.join(CHAT_ROLES)}, "
                               f"got {m.get('role')!r}")
        msgs.append({"role": m["role"], "content": _text(m.get("content"), where, f"{field}[{j}].content")})
    return _strip_answer(msgs, where, field)


def _answer(row: Row, where: str) -> str | None:
    rm = row.get("reward_model")
    if rm is not None:
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            raise ConvertError(f"{where}: field 'reward_model': expected an object with 'ground_truth'")
        return str(rm["ground_truth"])
    for key in ("answer", "label"):
        if row.get(key) is not None:
            return str(row[key])
    return None


def _openthoughts3(row: Row, n: int, where: str) -> Row:
    return {"prompt_id": f"ot3-{n:07d}", "messages": sharegpt_messages(row.get("conversations"), where)}


def _dapo(row: Row, n: int, where: str) -> Row:
    if "prompt" not in row:
        raise ConvertError(f"{where}: missing field 'prompt'")
    extra = row.get("extra_info")
    index = extra.get("index") if isinstance(extra, dict) else None
    out: Row = {"prompt_id": f"dapo-{n:07d}" if index is None or str(index) == "" else str(index),
                "messages": chat_messages(row["prompt"], where, "prompt")}
    ans = _answer(row, where)
    if ans is None:
        raise ConvertError(f"{where}: missing field 'reward_model.ground_truth' (or 'label')")
    return {**out, "answer": ans}


def _chat(row: Row, n: int, where: str) -> Row:
    field = "messages" if row.get("messages") is not None else "prompt"
    if row.get(field) is None:
        raise ConvertError(f"{where}: missing field 'messages' (or 'prompt')")
    pid = row.get("prompt_id", row.get("id"))
    out: Row = {"prompt_id": f"row-{n:07d}" if pid is None or str(pid) == "" else str(pid),
                "messages": chat_messages(row[field], where, field)}
    ans = _answer(row, where)
    return out if ans is None else {**out, "answer": ans}


CONVERTERS: dict[str, Callable[[Row, int, str], Row]] = {
    "openthoughts3": _openthoughts3, "dapo-math": _dapo, "chat": _chat}


def _rows(inputs: list[str]) -> Iterator[tuple[str, Any]]:
    for uri in inputs:
        path = local_path(uri)
        if not path.is_file():
            raise ConvertError(f"input file not found: {uri}")
        for i, row in enumerate(iter_rows(path, ConvertError, label=uri)):
            yield f"{uri}: row {i}", row


def convert(inputs: list[str], out: str | Path, dataset: str = "auto", dedupe: bool | None = None,
            sample: int | None = None, seed: int = 0) -> Converted:
    """Convert ``inputs`` (parquet / JSONL paths or store URIs, read in order) into one prompt
    file ``out``. ``dedupe`` drops rows whose prompt repeats an earlier one (default: on for
    dapo-math only); ``sample`` keeps that many rows chosen at random with ``seed``, in input order."""
    if dataset not in DATASETS:
        raise ConvertError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
    out = Path(out)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ConvertError(f"{out}: unsupported output file type (use .jsonl or .parquet)")
    if sample is not None and sample < 1:
        raise ConvertError(f"--sample must be at least 1, got {sample}")
    rows: list[Row] = []
    seen_text: set[str] = set()
    seen_ids: dict[str, str] = {}
    n = duplicates = 0
    kind = None if dataset == "auto" else dataset
    for where, raw in _rows(list(inputs)):
        if not isinstance(raw, dict):
            raise ConvertError(f"{where}: expected an object")
        if kind is None:
            kind = detect(raw, where)
        if dedupe is None:
            dedupe = kind == "dapo-math"
        row = CONVERTERS[kind](raw, n, where)
        n += 1
        if dedupe:
            key = hashlib.sha256(json.dumps(row["messages"], sort_keys=True).encode()).hexdigest()
            if key in seen_text:
                duplicates += 1
                continue
            seen_text.add(key)
        if row["prompt_id"] in seen_ids:
            raise ConvertError(f"{where}: duplicate prompt id {row['prompt_id']!r} (first at "
                               f"{seen_ids[row['prompt_id']]})")
        seen_ids[row["prompt_id"]] = where
        rows.append(row)
    if not rows:
        raise ConvertError(f"{', '.join(inputs)}: no rows")
    if sample is not None and sample < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    _publish(rows, out)
    return Converted(out, kind or dataset, n, len(rows), duplicates)


def _publish(rows: list[Row], out: Path) -> None:
    """Write ``rows`` next to ``out``, check the file loads as prompts, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        if out.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: [r.get(k) for r in rows] for k in ("prompt_id", "messages", "answer")}
            if all(a is None for a in cols["answer"]):
                del cols["answer"]
            pq.write_table(pa.table(cols), tmp)
        load_prompts(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

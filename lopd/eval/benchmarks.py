"""The benchmark registry and loaders: AIME 2024/2025, HMMT 2025 (math), LiveCodeBench v5/v6 (code).

Each benchmark loads from its usual hub dataset (where the network allows) or, when the
recipe's ``eval.datasets`` names a file for it, from a local / store JSONL or parquet file
in the same schema (field names can be mapped), or every such file of a local directory (a
downloaded copy of the hub dataset; the LiveCodeBench date windows apply to local copies
too). Any other name declared in ``eval.datasets`` (with ``kind``) is a local benchmark of
that kind. docs/eval.md shows how to make the local copies.

Schemas (after field mapping):

- math: ``id`` (optional: the row number otherwise), ``problem``, ``answer`` (required).
- code (LiveCodeBench ``code_generation_lite``): ``question_id``, ``question_content``,
  ``starter_code`` (may be empty), ``public_test_cases`` and ``private_test_cases`` (a JSON
  list of ``{input, output, testtype: stdin|functional}``, or for private tests on the hub
  base64(zlib(pickle(JSON string))) — decoded with an unpickler that refuses every class,
  so only plain strings can come out), ``metadata`` (JSON with ``func_name`` for functional
  tests), ``contest_date`` (ISO date, used by the v5 / v6 windows).

Hub sources (downloaded with ``huggingface_hub.snapshot_download``, no ``datasets`` needed):

=========  ====================================  =========================================
name       hub dataset                           selection
=========  ====================================  =========================================
aime24     HuggingFaceH4/aime_2024               all 30 (split train)
aime25     math-ai/aime25                        all 30 (split test)
hmmt25     MathArena/hmmt_feb_2025               all 30 (split train)
lcb_v5     livecodebench/code_generation_lite    contest_date in [2024-08-01, 2025-02-01)
lcb_v6     livecodebench/code_generation_lite    contest_date in [2025-02-01, 2025-05-01)
=========  ====================================  =========================================

(The v5 / v6 windows are the ones the Qwen3 and Lightning OPD reports use.)
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.eval.code_grader import CodeTest
from lopd.eval.lcb import safe_unpickle

MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CODE_PROMPT_STDIN = (
    "You will be given a question (problem specification) and will generate a correct Python program that "
    "matches the specification and passes all tests.\n\nQuestion: {problem}\n\n"
    "Read the inputs from stdin, solve the problem and write the answer to stdout (do not directly test on the "
    "sample inputs). Enclose your code within delimiters as follows.\n```python\n# YOUR CODE HERE\n```")
CODE_PROMPT_STARTER = (
    "You will be given a question (problem specification) and will generate a correct Python program that "
    "matches the specification and passes all tests.\n\nQuestion: {problem}\n\n"
    "You will use the following starter code to write the solution to the problem and enclose your code "
    "within delimiters.\n```python\n{starter_code}\n```")


class BenchmarkError(LopdError):
    """A benchmark that is unknown or whose data does not fit its schema (names file, row, field)."""


@dataclass
class Problem:
    benchmark: str
    problem_id: str
    kind: str
    """math | code"""
    messages: list[dict[str, str]]
    answer: str | None = None
    tests: list[CodeTest] = field(default_factory=list)
    func_name: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: str
    hub_id: str
    split: str
    description: str
    date_window: tuple[str, str] | None = None


REGISTRY: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("aime24", "math", "HuggingFaceH4/aime_2024", "train", "AIME 2024 (30 problems)"),
    BenchmarkSpec("aime25", "math", "math-ai/aime25", "test", "AIME 2025 (30 problems)"),
    BenchmarkSpec("hmmt25", "math", "MathArena/hmmt_feb_2025", "train", "HMMT February 2025 (30 problems)"),
    BenchmarkSpec("lcb_v5", "code", "livecodebench/code_generation_lite", "test",
                  "LiveCodeBench v5 (2024-08 to 2025-01)", ("2024-08-01", "2025-02-01")),
    BenchmarkSpec("lcb_v6", "code", "livecodebench/code_generation_lite", "test",
                  "LiveCodeBench v6 (2025-02 to 2025-04)", ("2025-02-01", "2025-05-01")),
]}

MATH_ID_FIELDS = ("id", "problem_id", "problem_idx", "ID")


# --------------------------------------------------------------------------- reading rows


def read_rows(uri: str) -> list[dict[str, Any]]:
    """Rows of a JSONL or parquet file given as a path or store URI, or of every such file of a local directory."""
    from lopd.data.prompts import local_path
    from lopd.data.prompts import read_rows as rows_of

    path = local_path(uri)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file())
        if not files:
            raise BenchmarkError(f"benchmark directory has no .jsonl or .parquet files: {uri}")
        return [row for p in files for row in rows_of(p, BenchmarkError, str(p))]
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {uri}")
    return rows_of(path, BenchmarkError, uri)


def hub_rows(spec: BenchmarkSpec) -> list[dict[str, Any]]:  # pragma: no cover - needs the network
    """Rows of a registry benchmark's hub dataset (the split's parquet / JSONL files)."""
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(spec.hub_id, repo_type="dataset",
                                      allow_patterns=["*.parquet", "*.jsonl", "*.json"]))
    except Exception as e:
        raise BenchmarkError(f"benchmark {spec.name}: hub dataset {spec.hub_id} unavailable "
                             f"({str(e).splitlines()[0]}); give a local file under eval.datasets.{spec.name}.path"
                             ) from None
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl")
                   and (spec.split in p.name or spec.split in p.parent.name))
    files = files or sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl"))
    rows: list[dict[str, Any]] = []
    for p in files:
        rows.extend(read_rows(str(p)))
    if not rows:
        raise BenchmarkError(f"benchmark {spec.name}: no data files for split {spec.split!r} in {spec.hub_id}")
    return rows


# --------------------------------------------------------------------------- decoding


def decode_tests(raw: Any, where: str) -> list[CodeTest]:
    """Test cases from a JSON list, or LiveCodeBench's base64(zlib(pickle(JSON))) encoding."""
    if raw is None or raw == "":
        return []
    data = raw
    if isinstance(raw, str):
        text = raw.strip()
        if not text.startswith("["):
            try:
                text = safe_unpickle(zlib.decompress(base64.b64decode(text)))
            except Exception as e:
                raise BenchmarkError(f"{where}: test cases are neither JSON nor LiveCodeBench-encoded ({e})") from None
            if not isinstance(text, str):
                raise BenchmarkError(f"{where}: decoded test cases are not a JSON string")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{where}: test cases are not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise BenchmarkError(f"{where}: test cases must be a list")
    out = []
    for j, t in enumerate(data):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise BenchmarkError(f"{where}: test {j} needs 'input' and 'output'")
        tt = t.get("testtype", "stdin")
        if tt not in ("stdin", "functional"):
            raise BenchmarkError(f"{where}: test {j}: testtype {tt!r} (stdin or functional)")
        out.append(CodeTest(str(t["input"]), str(t["output"]), tt))
    return out


# --------------------------------------------------------------------------- building problems


def _get(row: dict, fields: dict[str, str], name: str) -> Any:
    return row.get(fields.get(name, name))


def math_problems(name: str, rows: list[dict], fields: dict[str, str], template: str | None, src: str
                  ) -> list[Problem]:
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"benchmark {name}: {src}: row {i}"
        problem = _get(row, fields, "problem")
        answer = _get(row, fields, "answer")
        if problem is None or not str(problem).strip():
            raise BenchmarkError(f"{where}: missing field {fields.get('problem', 'problem')!r}")
        if answer is None or not str(answer).strip():
            raise BenchmarkError(f"{where}: missing field {fields.get('answer', 'answer')!r}")
        pid = next((row.get(f) for f in ([fields["id"]] if "id" in fields else MATH_ID_FIELDS)
                    if row.get(f) is not None), i)
        pid = str(pid)
        if pid in seen:
            raise BenchmarkError(f"{where}: duplicate problem id {pid!r}")
        seen.add(pid)
        text = (template or MATH_PROMPT).format(problem=str(problem).strip())
        out.append(Problem(name, pid, "math", [{"role": "user", "content": text}], answer=str(answer).strip()))
    return out


def code_problems(name: str, rows: list[dict], fields: dict[str, str], template: str | None, src: str,
                  window: tuple[str, str] | None = None) -> list[Problem]:
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"benchmark {name}: {src}: row {i}"
        if window:
            date = str(_get(row, fields, "contest_date") or "")[:10]
            if not window[0] <= date < window[1]:
                continue
        question = _get(row, fields, "question_content")
        if question is None or not str(question).strip():
            raise BenchmarkError(f"{where}: missing field {fields.get('question_content', 'question_content')!r}")
        tests = decode_tests(_get(row, fields, "public_test_cases"), f"{where}: public_test_cases") + \
            decode_tests(_get(row, fields, "private_test_cases"), f"{where}: private_test_cases")
        if not tests:
            raise BenchmarkError(f"{where}: no test cases (fields public_test_cases / private_test_cases)")
        meta = _get(row, fields, "metadata") or {}
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) if meta.strip() else {}
            except json.JSONDecodeError:
                raise BenchmarkError(f"{where}: field 'metadata' is not valid JSON") from None
        func = meta.get("func_name") if isinstance(meta, dict) else None
        if any(t.testtype == "functional" for t in tests) and not func:
            raise BenchmarkError(f"{where}: functional tests need metadata.func_name")
        pid = str(_get(row, fields, "question_id") if _get(row, fields, "question_id") is not None else i)
        if pid in seen:
            raise BenchmarkError(f"{where}: duplicate question id {pid!r}")
        seen.add(pid)
        starter = str(_get(row, fields, "starter_code") or "")
        tpl = template or (CODE_PROMPT_STARTER if starter.strip() else CODE_PROMPT_STDIN)
        text = tpl.format(problem=str(question).strip(), starter_code=starter)
        out.append(Problem(name, pid, "code", [{"role": "user", "content": text}], tests=tests, func_name=func))
    return out


def load_benchmark(name: str, datasets: dict[str, Any] | None = None,
                   hub: Callable[[BenchmarkSpec], list[dict]] = hub_rows) -> list[Problem]:
    """The problems of benchmark ``name`` (in file order), from ``datasets[name]`` if given, else the hub.

    ``datasets`` is the recipe's ``eval.datasets`` (name → EvalDatasetConfig or a dict with
    ``path``, ``kind``, ``fields``, ``prompt_template``).
    """
    datasets = datasets or {}
    local = datasets.get(name)
    if local is not None and not isinstance(local, dict):
        local = local.model_dump()
    spec = REGISTRY.get(name)
    if spec is None and local is None:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(REGISTRY)}; "
                             f"or declare it under eval.datasets with path and kind)")
    kind = (local or {}).get("kind") or (spec.kind if spec else None)
    if kind not in ("math", "code"):
        raise BenchmarkError(f"eval.datasets.{name}.kind: must be math or code for a benchmark not in the registry")
    fields = dict((local or {}).get("fields") or {})
    template = (local or {}).get("prompt_template")
    if local is not None:
        src = local["path"]
        rows = read_rows(src)
    else:
        src = spec.hub_id
        rows = hub(spec)
    window = spec.date_window if spec else None
    if kind == "math":
        probs = math_problems(name, rows, fields, template, src)
    else:
        probs = code_problems(name, rows, fields, template, src, window)
    if not probs:
        within = f" with contest_date in [{window[0]}, {window[1]})" if window else ""
        raise BenchmarkError(f"benchmark {name}: {src}: no problems{within}")
    return probs


def benchmark_kind(name: str, datasets: dict[str, Any] | None = None) -> str:
    """math or code, without loading the data."""
    local = (datasets or {}).get(name)
    kind = (local if isinstance(local, dict) else (local.model_dump() if local is not None else {})).get("kind")
    if kind:
        return kind
    if name in REGISTRY:
        return REGISTRY[name].kind
    raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(REGISTRY)})")

"""LiveCodeBench's grading rules, applied to a program run in lopd's sandbox.

The rules are those of LiveCodeBench's ``evaluation/testing_util.py`` (docs/eval.md lists them
and the few places lopd differs): the import prelude below runs before every program; the
mode is functional when the problem has a ``func_name`` (LeetCode style) and stdin otherwise;
each test has its own timeout (6 s by default) and the whole run a global one of
``(timeout + 1) · tests + 5`` seconds; the first failing test decides.

The program runs in one sandboxed child per (program, all tests) under
:mod:`lopd.eval.lcb_driver`; this module compares what it reports with the expected outputs,
which never enter the sandbox:

- stdin: both texts are stripped, split on ``\\n``, every line stripped at both ends; the line
  counts must agree and each line must be equal as a string or, token by token, as
  ``Decimal`` numbers (so ``1.0`` = ``1``, but ``1000000007`` ≠ ``1000000008``);
- functional: the expected output is parsed as JSON and must ``==`` the return value (a
  tuple counts as a list).
"""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

PRELUDE_FROM = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing")
PRELUDE_IMPORT = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                  "statistics", "itertools", "functools", "operator", "io", "sys", "json")
PRELUDE = "".join(f"from {m} import *\n" for m in PRELUDE_FROM) + \
    "".join(f"import {m}\n" for m in PRELUDE_IMPORT) + "sys.setrecursionlimit(50000)\n"
"""LiveCodeBench's ``import_string``, character for character."""
MAX_INT_DIGITS = 50000
"""``sys.set_int_max_str_digits`` of LiveCodeBench's runner (the child and expected outputs)."""
DRIVER = Path(__file__).with_name("lcb_driver.py")


def rules(timeout_s: float, memory_mb: int) -> dict:
    """The code grading rules in force, for reports (two reports compare equal iff these do)."""
    return {"harness": "LiveCodeBench testing_util",
            "prelude": "LiveCodeBench import_string (typing, math, collections, heapq, …; recursion limit 50000)",
            "comparison": "stdin: lines stripped at both ends, exact or Decimal token match; "
                          "functional: return value == JSON-parsed expected (tuple as list)",
            "timeout_per_test_s": timeout_s, "global_timeout": "(timeout + 1) * tests + 5 s",
            "memory_mb": memory_mb, "code_extraction": "last fenced block after </think> (python preferred)"}


class _NoClassUnpickler(pickle.Unpickler):
    """Unpickles only primitive values (str, bytes, numbers, lists, dicts, sets): any class is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def safe_unpickle(data: bytes):
    return _NoClassUnpickler(io.BytesIO(data)).load()


class _Unequal:
    """A return value that was not a plain value: equal to nothing."""

    def __eq__(self, other) -> bool:
        return False

    __hash__ = object.__hash__


def _big_int(text: str) -> int:
    """``int(text)`` for up to :data:`MAX_INT_DIGITS` digits, whatever this process's own limit."""
    digits = text.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(digits)} digits")
    if len(digits) <= 4000:
        return int(text)
    value = 0
    for k in range(0, len(digits), 4000):
        chunk = digits[k: k + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return -value if text.startswith("-") else value


def parse_expected(text: str):
    """An expected functional output, parsed as LiveCodeBench does (``json.loads``)."""
    return json.loads(text, parse_int=_big_int)


def decode_return(packed: str):
    if not packed:
        return _Unequal()
    try:
        return safe_unpickle(base64.b64decode(packed))
    except Exception:
        return _Unequal()


def stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except Exception:
        return None


def stdout_matches(expected: str, got: str) -> bool:
    """LiveCodeBench's stdin comparison (see the module docstring)."""
    exp, out = stripped_lines(expected), stripped_lines(got)
    if len(exp) != len(out):
        return False
    for e, o in zip(exp, out, strict=True):
        if e == o:
            continue
        de, do = _decimals(e), _decimals(o)
        try:
            if de is None or do is None or de != do:
                return False
        except ArithmeticError:  # signalling NaN
            return False
    return True


def functional_matches(expected, got) -> bool:
    try:
        return bool(got == expected)
    except Exception:
        return False


@dataclass
class TestOutcome:
    status: str
    """passed | wrong_answer | timeout | exit (runtime error) | memory_limit | output_limit | …"""
    detail: str = ""


def global_timeout_s(timeout_s: float, tests: int) -> float:
    return (timeout_s + 1) * tests + 5


def job_files(code: str, mode: str, func_name: str | None, inputs: list[str], timeout_s: float,
              max_output: int) -> dict[str, bytes]:
    job = {"code": code, "mode": mode, "func_name": func_name, "inputs": inputs, "timeout_s": timeout_s,
           "max_output": max_output, "prelude": PRELUDE}
    return {"main.py": DRIVER.read_bytes(), "job.json": json.dumps(job).encode()}


def _records(stdout: bytes) -> tuple[dict[int, dict], str | None]:
    recs: dict[int, dict] = {}
    setup = None
    for line in stdout.decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "setup" in rec and setup is None:
            setup = str(rec["setup"])
        elif isinstance(rec.get("i"), int):
            recs.setdefault(rec["i"], rec)
    return recs, setup


def _error_status(text: str) -> str:
    return "memory_limit" if "MemoryError" in text else "exit"


def outcomes(run_status: str, stdout: bytes, stderr: bytes, mode: str, outputs: list[str]) -> list[TestOutcome]:
    """Per-test outcomes up to and including the first failure, from a finished driver run."""
    recs, setup = _records(stdout)
    tail = (stderr.decode(errors="replace").strip().splitlines()[-1:] or [""])[0][:200]
    if setup is not None:
        return [TestOutcome(_error_status(setup), f"test 0: {setup[:200]}")]
    try:
        expected = [parse_expected(o) for o in outputs] if mode == "functional" else outputs
    except ValueError as e:
        return [TestOutcome("exit", f"expected output is not JSON ({e})")]
    out: list[TestOutcome] = []
    for i, exp in enumerate(expected):
        rec = recs.get(i)
        if rec is None:
            status = run_status if run_status != "ok" else "exit"
            out.append(TestOutcome(status, f"test {i}: {tail or 'no result'}"))
        elif "error" in rec:
            err = str(rec["error"])
            out.append(TestOutcome("timeout" if rec.get("timeout") else _error_status(err), f"test {i}: {err[:200]}"))
        elif rec.get("output_limit"):
            out.append(TestOutcome("output_limit", f"test {i}: output limit"))
        else:
            ok = functional_matches(exp, decode_return(rec.get("ret", ""))) if mode == "functional" \
                else stdout_matches(exp, str(rec.get("out", "")))
            out.append(TestOutcome("passed" if ok else "wrong_answer", "" if ok else f"test {i}: output differs"))
        if out[-1].status != "passed":
            break
    return out


def cpu_budget_s(timeout_s: float, tests: int) -> int:
    return int(math.ceil(global_timeout_s(timeout_s, tests)))


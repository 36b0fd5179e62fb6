"""The child side of LiveCodeBench-rules grading; runs inside the sandbox as ``main.py``.

Standard library only: it is copied into the sandbox's working directory next to ``job.json``
(``code``, ``mode`` stdin|functional, ``func_name``, ``inputs``, ``timeout_s``, ``max_output``,
``prelude``) and run by the sandbox's interpreter. It reproduces how LiveCodeBench's
``testing_util`` executes a program (see docs/eval.md):

- stdin mode: a trailing ``if __name__ == '__main__':`` block is unwrapped, top-level imports
  are kept and every other statement moves into one function, which runs once per test after
  the import prelude, with ``sys.stdin`` replaced by the test input, ``print`` output captured
  and ``SystemExit`` ignored;
- functional mode: the prelude plus the program run as a module; ``Solution()`` is made once
  (when the source mentions ``class Solution``) and its method is called with one JSON value
  per input line, for every test on the same instance;
- a per-test alarm raises ``TimeoutException``; the first timeout or exception ends the run;
- LiveCodeBench's ``reliability_guard`` is applied (``os.fork`` excepted: the sandbox limits
  processes instead), and ``sys.set_int_max_str_digits(50000)`` as its runner does.

Results go to the grader as JSON lines on the original stdout (file descriptor 1 is pointed
at ``/dev/null`` for the program): ``{"i", "out"}`` (captured stdout), ``{"i", "ret"}``
(base64 pickle of the plain-value return), ``{"i", "error", "timeout"}``, ``{"i",
"output_limit"}`` or ``{"setup"}`` when the program cannot even be loaded. The grader compares
outputs with the expected ones, which never enter the sandbox.
"""

import ast
import base64
import builtins
import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import types
from unittest import mock

sys.set_int_max_str_digits(50000)
GUARDED_OS = ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "killpg", "rename",
              "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot",
              "lchflags", "lchmod", "lchown", "getcwd", "chdir")
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


class TimeoutException(Exception):  # noqa: N818 - LiveCodeBench's name, matched in its error text
    """Raised by the per-test alarm."""


def _on_alarm(signum, frame):
    raise TimeoutException


class _Capture(io.StringIO):
    """Captured stdout of one test; refuses to grow past ``cap`` characters."""

    exceeded = False

    def __init__(self, cap: int):
        super().__init__()
        self.cap, self.size = cap, 0

    def write(self, s):
        self.size += len(s)
        if self.size > self.cap:
            _Capture.exceeded = True
            raise OSError("output limit exceeded")
        return super().write(s)

    def close(self):
        pass


def guard() -> None:
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in GUARDED_OS:
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in BLOCKED_MODULES:
        sys.modules[name] = None


def unwrap_main_guard(code: str) -> str:
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        if isinstance(last, ast.If) and ast.unparse(last.test).strip() == "__name__ == '__main__'":
            code = ast.unparse(tree.body[:-1]) + "\n" + ast.unparse(last.body)
    except Exception:
        pass
    return code


def as_function(code: str, prelude: str) -> str:
    try:
        tree = ast.parse(code)
        imports = [s for s in tree.body if isinstance(s, ast.Import | ast.ImportFrom)]
        body = [s for s in tree.body if not isinstance(s, ast.Import | ast.ImportFrom)]
        fn = ast.FunctionDef(name="wrapped_function", args=ast.arguments(
            posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=body, decorator_list=[],
            lineno=-1)
        return prelude + "\n" + ast.unparse(imports) + "\n" + ast.unparse(fn)
    except Exception:
        return code


def load(job: dict):
    """The callable under test (compiled under the alarm), or an exception."""
    if job["mode"] == "functional":
        code, name = job["prelude"] + "\n\n" + job["code"], job["func_name"]
    else:
        code, name = as_function(unwrap_main_guard(job["code"]), job["prelude"]), "wrapped_function"
    signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
    try:
        mod = types.ModuleType("tmp_sol", "")
        exec(code, mod.__dict__)
        obj = mod.Solution() if "class Solution" in code else mod
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return getattr(obj, name)


def plain(v, depth: int = 0):
    """``v`` as built-in values only (subclasses and numpy scalars converted), for pickling."""
    if depth > 500:
        raise ValueError("nested too deeply")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v).__module__ == "numpy" and getattr(v, "shape", None) == ():
        return plain(v.item(), depth + 1)
    for base in (bool, int, float, str):
        if isinstance(v, base):
            return base(v)
    if isinstance(v, dict):
        return {plain(k, depth + 1): plain(x, depth + 1) for k, x in v.items()}
    for base in (list, tuple, set, frozenset):
        if isinstance(v, base):
            return base(plain(x, depth + 1) for x in v)
    raise TypeError(f"not a plain value: {type(v).__name__}")


def pack(v) -> str:
    try:
        return base64.b64encode(pickle.dumps(plain(v), protocol=5)).decode()
    except Exception:
        return ""


def run_stdin_test(method, inputs: str, cap: int):
    """Captured stdout of one call (LiveCodeBench's stdin replacement), or raises."""
    lines = iter(inputs.split("\n"))
    own = sys.stdin
    out = _Capture(cap)
    saved = sys.stdout
    sys.stdout = out
    try:
        with contextlib.ExitStack() as st:
            # LiveCodeBench stacks these patches as decorators, so they are entered bottom-up: the
            # methods of the process's own stdin object first, then sys.stdin itself, then open().
            st.enter_context(mock.patch.object(own, "read", lambda *a: inputs))
            st.enter_context(mock.patch.object(own, "readlines", lambda *a: inputs.split("\n")))
            st.enter_context(mock.patch.object(own, "readline", lambda *a: next(lines)))
            st.enter_context(mock.patch("sys.stdin", io.StringIO(inputs)))
            st.enter_context(mock.patch("builtins.open", mock.mock_open(read_data=inputs)))
            try:
                method()
            except SystemExit:
                pass
    finally:
        sys.stdout = saved
    return out


def main() -> None:
    with open("job.json") as f:
        job = json.load(f)
    chan = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's own stdin, as in a multiprocessing child
    me = os.getpid()

    def emit(rec: dict) -> None:
        if os.getpid() != me:  # a process the program forked came back here
            os._exit(0)
        chan.write(json.dumps(rec) + "\n")
        chan.flush()

    signal.signal(signal.SIGALRM, _on_alarm)
    guard()
    try:
        method = load(job)
        args = [[json.loads(ln) for ln in inp.split("\n")] for inp in job["inputs"]] \
            if job["mode"] == "functional" else job["inputs"]
    except BaseException as e:
        emit({"setup": repr(e)[:300]})
        return
    for i, inp in enumerate(args):
        signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
        try:
            if job["mode"] == "functional":
                got = method(*inp)
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec = {"i": i, "ret": pack(list(got) if isinstance(got, tuple) else got)}
            else:
                out = run_stdin_test(method, inp, job["max_output"])
                signal.setitimer(signal.ITIMER_REAL, 0)
                rec = {"i": i, "output_limit": True} if _Capture.exceeded else {"i": i, "out": out.getvalue()}
        except Exception as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if _Capture.exceeded:
                emit({"i": i, "output_limit": True})
                return
            text = repr(e)
            emit({"i": i, "error": text[:300], "timeout": "timeoutexception" in text.lower()})
            return
        emit(rec)
        if "output_limit" in rec:
            return


if __name__ == "__main__":
    main()

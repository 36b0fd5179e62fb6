"""The Python interpreter graded programs run under: one the sandbox's unprivileged uid can
execute, in isolated mode (:mod:`lopd.eval.sandbox` runs it)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lopd.eval.sandbox import SandboxError, capabilities


def _world_executable(path: str) -> bool:
    """True when any uid may execute ``path``: o+x on every directory above it and o+rx on it."""
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & 0o005 != 0o005:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def sandbox_python() -> str:
    """A Python interpreter the sandbox uid can run.

    ``LOPD_SANDBOX_PYTHON`` if set, else this interpreter when it is world-executable, else the
    system ``python3`` (e.g. when the venv lives under a 0700 ``/root``). Programs under test
    need only the standard library.
    """
    env = os.environ.get("LOPD_SANDBOX_PYTHON")
    if env:
        return env
    for cand in (sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and os.path.exists(cand) and (not capabilities()["root"] or _world_executable(cand)):
            return cand
    raise SandboxError("sandbox: no Python interpreter that an unprivileged uid can execute "
                       "(set LOPD_SANDBOX_PYTHON)")


def python_argv(script: str = "main.py") -> list[str]:
    """Interpreter command for a Python program: isolated mode (no env, no user site)."""
    return [sandbox_python(), "-I", script]

"""The repository and the real ``lopd`` CLI: its root, running the CLI in a subprocess as a user
would, and the arithmetic corpus ``lopd init-model --corpus`` trains tiny tokenizers on."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lopd_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``lopd`` CLI in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "lopd.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"lopd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def write_corpus(path: Path, n: int = 2000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 99) for _ in range(3))
        lines.append(f"Compute {a}+{b}+{c}. {a}+{b}={a + b}; {a + b}+{c}={a + b + c}. "
                     f"The answer is \\boxed{{{a + b + c}}}.")
    path.write_text("\n".join(lines) + "\n")
    return path

"""Shared fixtures: a real SeaweedFS S3 server, stores on both backends, tiny models."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.seaweed import BUCKET, SeaweedServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session; sets the AWS env vars."""
    server = SeaweedServer(tmp_path_factory.mktemp("weed")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    """A fresh, empty store root on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    request.getfixturevalue("s3_server")
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_corpus(path: Path, n: int = 2000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 99) for _ in range(3))
        lines.append(f"Compute {a}+{b}+{c}. {a}+{b}={a + b}; {a + b}+{c}={a + b + c}. "
                     f"The answer is \\boxed{{{a + b + c}}}.")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def lopd_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``lopd`` CLI in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "lopd.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"lopd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> Path:
    """A tiny random Qwen3 made by ``lopd init-model`` (session-wide, read-only)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    lopd_cli("init-model", "--out", str(out), "--corpus", str(corpus), "--vocab-size", "384", "--seed", "1")
    return out

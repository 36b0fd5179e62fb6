"""Shared fixtures: a real SeaweedFS S3 server, stores on both backends, tiny models.

Plain helpers (functions, constants) live in :mod:`tests.helpers`; every fixture more than one
test module uses lives here.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.helpers.cli import lopd_cli, write_corpus
from tests.helpers.seaweed import BUCKET, SeaweedServer

# Each pytest-xdist worker, and every process it starts, gets its share of the cores for OpenMP
# (torch's CPU kernels). torch's default, one thread per core in every process, makes the workers'
# threads wait on each other: an eval stage beside a busy core runs 2x slower with two threads than
# with one, and in the full suite, beside the other worker, 6x. An OMP_NUM_THREADS already set wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# The longest end-to-end modules, started first: `make test` runs two pytest-xdist workers with
# whole files as work units in collection order (--no-loadscope-reorder), and a long file dealt out
# last would run alone at the end.
LONGEST_FIRST = ("test_embedded.py", "test_real_vocab_pipeline.py", "test_eval_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session; sets the AWS env vars."""
    server = SeaweedServer(tmp_path_factory.mktemp("weed")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop(signal.SIGKILL)  # its data is a temp dir; a graceful stop can take 20 s
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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> Path:
    """A tiny random Qwen3 made by ``lopd init-model`` (session-wide, read-only)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    lopd_cli("init-model", "--out", str(out), "--corpus", str(corpus), "--vocab-size", "384", "--seed", "1")
    return out


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory, tiny_model) -> Path:
    """Another tiny random Qwen3 (other seed) sharing the tiny model's tokenizer (session-wide, read-only)."""
    out = tmp_path_factory.mktemp("models") / "teacher"
    lopd_cli("init-model", "--out", str(out), "--tokenizer", str(tiny_model), "--seed", "7")
    return out


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with Qwen3's real tokenizer, stock chat template and 151,936-row
    embedding, made by ``lopd init-model --tokenizer qwen3`` (session-wide, read-only)."""
    out = tmp_path_factory.mktemp("qwen3") / "tiny"
    lopd_cli("init-model", "--out", str(out), "--tokenizer", "qwen3", "--seed", "1",
             env={"LOPD_CACHE": str(out.parent / "cache")})
    return out


@pytest.fixture(scope="session")
def opd_models(tmp_path_factory, tiny_model, teacher_model) -> tuple[Path, Path]:
    """(student, teacher) for OPD: the tiny and teacher models with weights scaled by 3, so their
    policies are far from uniform (session-wide, read-only: tests only read and publish them)."""
    from tests.helpers.training import scale_weights  # imports torch: only for the tests that need it

    d = tmp_path_factory.mktemp("opd-models")
    student = scale_weights(tiny_model, d / "student", 3.0)
    teacher = scale_weights(teacher_model, d / "teacher", 3.0)
    return student, teacher

"""DeepSpeed's CPU op: built once per environment (keyed by the ninja found), announced while it
builds, and a torch-extension lock file left by a killed process never hangs the next one."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lopd.train import cpu_ops

OP = "deepspeed_shm_comm"


@pytest.fixture
def fresh_env(monkeypatch, tmp_path):
    """No TORCH_EXTENSIONS_DIR (restored afterwards: the code under test sets it) and torch's
    default extensions root under ``tmp_path``."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "placeholder")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "default"))
    return tmp_path


def _fake_ninja(d: Path, version: str) -> None:
    d.mkdir()
    (d / "ninja").write_text(f"#!/bin/sh\necho {version}\n")
    (d / "ninja").chmod(0o755)


def test_build_root_keyed_by_the_ninja_found(fresh_env, monkeypatch):
    _fake_ninja(fresh_env / "a", "1.11.1")
    _fake_ninja(fresh_env / "b", "1.13.2")
    monkeypatch.setenv("PATH", f"{fresh_env / 'a'}:/usr/bin:/bin")
    first = cpu_ops.build_root()
    assert cpu_ops.build_root() == first and first.parent == fresh_env / "default"
    assert "ninja1.11.1" in first.name
    monkeypatch.setenv("PATH", f"{fresh_env / 'b'}:/usr/bin:/bin")
    assert cpu_ops.build_root() != first
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(fresh_env / "mine"))
    assert cpu_ops.build_root() == fresh_env / "mine"


class FakeBuilder:
    """Stands in for DeepSpeed's op builder: "building" writes the shared object."""

    name = OP

    def __init__(self):
        self.loads = 0

    def is_compatible(self):
        return True

    def load(self, verbose=False):
        from torch.utils.cpp_extension import _get_build_directory

        self.loads += 1
        so = Path(_get_build_directory(self.name, verbose=False)) / f"{self.name}.so"
        if not so.exists():
            time.sleep(0.05)
            so.write_bytes(b"")


@pytest.fixture
def fake_builder(monkeypatch):
    import deepspeed.accelerator

    builder = FakeBuilder()

    class Accel:
        def create_op_builder(self, name):
            assert name == cpu_ops.SHM_OP
            return builder

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accel())
    return builder


def _events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_build_is_announced_once_per_environment(fresh_env, fake_builder, capsys):
    assert cpu_ops.load_shm_comm_op()
    events = _events(capsys.readouterr().err)
    assert [e["event"] for e in events] == ["building_cpu_op", "built_cpu_op"]
    assert events[1]["seconds"] >= 0 and events[0]["build_dir"].startswith(str(fresh_env / "default" / "lopd-"))
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(cpu_ops.build_root())
    assert cpu_ops.load_shm_comm_op()  # built: loaded quietly from the same place
    assert _events(capsys.readouterr().err) == [] and fake_builder.loads == 2


def test_waiting_for_another_build_is_announced(fresh_env, fake_builder, capsys):
    import fcntl

    root = cpu_ops.build_root()
    root.mkdir(parents=True)
    with open(root / f"{OP}.lopd-lock", "a") as other:  # another process building right now
        fcntl.flock(other, fcntl.LOCK_EX)
        threading.Timer(0.3, lambda: fcntl.flock(other, fcntl.LOCK_UN)).start()
        assert cpu_ops.load_shm_comm_op()
    assert [e["event"] for e in _events(capsys.readouterr().err)][0] == "waiting_for_cpu_op"


@pytest.mark.slow
def test_stale_extension_lock_is_removed(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # the default place, here and in the build below
    root = tmp_path / "ext"
    built = cpu_ops.build_root() / OP
    if not (built / f"{OP}.so").is_file():  # build it where every later DeepSpeed process finds it (~1 min once)
        subprocess.run([sys.executable, "-c", "from lopd.train.cpu_ops import load_shm_comm_op as f; assert f()"],
                       env={**os.environ, "DS_ACCELERATOR": "cpu"}, check=True, capture_output=True, timeout=600)
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns("lock"))
    (root / OP / "lock").touch()  # what a process SIGKILLed while loading the op leaves behind
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    proc = subprocess.run([sys.executable, "-c", "from lopd.train.engine import init_distributed as i; print(i())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(0, 1)" in proc.stdout
    assert "stale torch extension lock" in proc.stderr
    assert "building_cpu_op" not in proc.stderr  # built already: nothing to announce
    assert not (root / OP / "lock").exists() and (root / OP / f"{OP}.so").is_file()

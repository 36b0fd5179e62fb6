"""A torch-extension lock file left by a killed process must not hang the next training process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
OP = "deepspeed_shm_comm"


def test_stale_extension_lock_is_removed(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # the default place, here and in the build below
    root = tmp_path / "ext"
    built = Path(_get_build_directory(OP, verbose=False))
    if not (built / f"{OP}.so").is_file():  # build it where every later DeepSpeed process finds it (~1 min once)
        subprocess.run([sys.executable, "-c", "from lopd.train.cpu_ops import load_shm_comm_op as f; assert f()"],
                       env={**os.environ, "DS_ACCELERATOR": "cpu"}, check=True, capture_output=True, timeout=300)
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns("lock"))
    (root / OP / "lock").touch()  # what a process SIGKILLed while loading the op leaves behind
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    proc = subprocess.run([sys.executable, "-c", "from lopd.train.engine import init_distributed as i; print(i())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(0, 1)" in proc.stdout
    assert "stale torch extension lock" in proc.stderr
    assert not (root / OP / "lock").exists() and (root / OP / f"{OP}.so").is_file()

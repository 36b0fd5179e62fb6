"""Why a pod failed and what it printed, after the pods are gone: the stage harness's one-line
termination message, its log uploaded to the store (lopd.podlog), `lopd logs` reading it
when the cluster has no pods left (recorded API responses, tests/fixtures/k8s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lopd.layout import stage_log_key, stage_prefix
from lopd.podlog import stored_logs
from lopd.stage import StageError, entrypoint
from lopd.store import open_store
from tests.helpers.cli import REPO, lopd_cli
from tests.test_k8s_status import FX, TINY, Replay, load


def test_entrypoint_writes_the_termination_message(tmp_path, monkeypatch):
    term = tmp_path / "termination-log"
    monkeypatch.setenv("LOPD_TERMINATION_LOG", str(term))
    monkeypatch.delenv("LOPD_DEBUG", raising=False)

    def bad(argv):
        raise StageError("--shard-index 7 out of range for --num-shards 4\n(0..3)")

    with pytest.raises(SystemExit) as e:
        entrypoint(bad, [])
    assert e.value.code == 2
    assert term.read_text() == "error: --shard-index 7 out of range for --num-shards 4 (0..3)\n"

    def crash(argv):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError):
        entrypoint(crash, [])
    assert term.read_text() == "RuntimeError: CUDA error: out of memory\n"


TEE = """
import subprocess, sys
from lopd.podlog import start_stage_log
from lopd.store import open_store
start_stage_log(open_store(sys.argv[1]), "runs/fx/sft-data", 1, 3, False)
print("stdout line", flush=True)
print("stderr line", file=sys.stderr, flush=True)
subprocess.run(["echo", "from a child process"], check=True)
sys.exit(3)
"""


def test_stage_log_uploaded_and_read_back_when_pods_are_gone(tmp_path):
    uri = f"file://{tmp_path / 'store'}"
    proc = subprocess.run([sys.executable, "-c", TEE, uri], capture_output=True, text=True, cwd=REPO,
                          env={"LOPD_LOG_TO_STORE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 3
    assert "stdout line" in proc.stderr and "from a child process" in proc.stderr  # still in the pod's log
    store = open_store(uri)
    key = stage_log_key(stage_prefix("fx", "sft-data"), "1-of-3")
    assert key == "runs/fx/sft-data/logs/1-of-3.log"
    text = store.read_bytes(key).decode()
    assert text.splitlines() == ["stdout line", "stderr line", "from a child process"]
    assert stored_logs(store, "fx", "sft-data") == [(key, text)]

    rp = Replay(load("run-no-training-operator"))  # no pods left
    try:
        kubecfg = str(rp.kubeconfig(tmp_path / "kubeconfig"))
        out = lopd_cli("logs", "sft-data", "-r", TINY, *FX, "--set", f"store={uri}", "--kubeconfig", kubecfg,
                       "--tail", "1").stdout
        assert out.splitlines() == [f"==> {store.url(key)} (uploaded by the stage; its pods are gone) <==",
                                    "from a child process"]
        none = lopd_cli("logs", "precompute", "-r", TINY, *FX, "--set", f"store={uri}", "--kubeconfig", kubecfg,
                        check=False)
        assert none.returncode == 2 and none.stderr.strip().startswith("error: no pods for stage precompute")
    finally:
        rp.close()

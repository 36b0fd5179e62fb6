"""S3 faults on a real SeaweedFS server: killed and restarted mid-transfer, and a server that
stays down.

Each test starts its own server so restarting it never disturbs the session's server. The
server is killed (SIGKILL: an endpoint that crashes), which is also what keeps these tests
short: a graceful stop drains open transfers for up to 20 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lopd.store import StoreError, file_digest, open_store
from tests.helpers.seaweed import BUCKET, SeaweedServer

pytestmark = pytest.mark.slow


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    server = SeaweedServer(tmp_path / "weed").start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    yield server
    server.stop(signal.SIGKILL)


def _big_file(path, mib: int):
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(mib):
            f.write(block[:-8] + i.to_bytes(8, "little"))
    return path


def _run_with_restart(fn, server: SeaweedServer, after: float, down: float, started=None):
    """Run fn() in a thread; kill the server once `started()` is true (or after `after` s when
    no probe is given), restart it `down` s later."""
    result: dict = {}

    def target():
        try:
            fn()
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    deadline = time.monotonic() + 30
    if started is None:
        time.sleep(after)
    else:  # inject the fault as soon as the first bytes have moved
        while not started() and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
    assert t.is_alive(), "transfer finished before the fault was injected; make the file larger"
    server.stop(signal.SIGKILL)
    time.sleep(down)
    server.start()
    t.join(timeout=300)
    assert not t.is_alive()
    print(f"transfer across a server restart: {'completed' if result.get('ok') else result.get('error')}")
    return result


def test_upload_survives_restart_or_fails_cleanly(own_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LOPD_S3_CONCURRENCY", "2")  # slower upload, so the fault lands mid-transfer
    src = _big_file(tmp_path / "big.bin", 320)
    s = open_store(f"s3://{BUCKET}/faults")
    res = _run_with_restart(lambda: s.put_file(src, "big.bin"), own_server, after=1.0, down=2.0)
    if res.get("ok"):
        assert s.hash_object("big.bin") == (file_digest(src), src.stat().st_size)
    else:  # a clear error, and no partial object
        err = res["error"]
        assert isinstance(err, StoreError) and "s3://lopd-test/faults/big.bin" in str(err)
        assert not s.exists("big.bin")


def test_download_survives_restart_or_fails_cleanly(own_server, tmp_path, monkeypatch):
    src = _big_file(tmp_path / "big.bin", 320)
    s = open_store(f"s3://{BUCKET}/faults")
    s.put_file(src, "big.bin")
    monkeypatch.setenv("LOPD_S3_CONCURRENCY", "2")
    dest = tmp_path / "dl" / "big.bin"
    dest.parent.mkdir()

    def bytes_landed() -> bool:
        for p in dest.parent.iterdir():
            try:
                if p.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed meanwhile
                pass
        return False

    res = _run_with_restart(lambda: s.get_file("big.bin", dest), own_server, after=0.0, down=2.0,
                            started=bytes_landed)
    if res.get("ok"):
        assert file_digest(dest) == file_digest(src)
    else:
        assert isinstance(res["error"], StoreError)
        assert not dest.exists()  # never a silent partial file
    assert not list(dest.parent.glob(".*.part"))


def test_server_down_gives_one_clear_error(own_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("LOPD_S3_TRANSFER_RETRIES", "1")
    s = open_store(f"s3://{BUCKET}/down")
    src = _big_file(tmp_path / "f.bin", 20)
    own_server.stop()
    with pytest.raises(StoreError) as e:
        s.put_file(src, "f.bin")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("upload to s3://lopd-test/down/f.bin failed")
    with pytest.raises(StoreError, match="read of s3://lopd-test/down/f.bin failed"):
        s.read_bytes("f.bin")
    own_server.start()
    assert not s.exists("f.bin")

"""The sandbox as the chart runs it: a non-root grader with every capability dropped, under a
seccomp profile that refuses namespaces (as the container runtime's default one does), with
a credential in its environment. A hostile program must find no secret and reach nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers.net import recording_listener

REPO = Path(__file__).resolve().parents[1]
SECRET = "lopd-fake-secret-" + uuid.uuid4().hex

HOSTILE = r'''
import glob, json, os, socket
found = {"env": sorted(os.environ), "proc": [], "token": None, "tcp": None, "unix": None, "abstract": None}
for p in ["/proc/%d/environ" % os.getppid()] + glob.glob("/proc/[0-9]*/environ"):
    for name in (p, p.replace("environ", "cmdline"), p.replace("environ", "mem")):
        try:
            with open(name, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        if @SECRET@ in data:  # this run's secret value (other processes' command lines may say "secret")
            found["proc"].append(name)
try:
    found["token"] = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()
except OSError:
    pass
for key, fam, addr in (("tcp", socket.AF_INET, ("127.0.0.1", @PORT@)), ("unix", socket.AF_UNIX, @UNIX@),
                       ("abstract", socket.AF_UNIX, "\0" + @ABSTRACT@)):
    try:
        s = socket.socket(fam)
        s.settimeout(1)
        s.connect(addr)
        s.sendall(b"leak")
        found[key] = "connected"
    except OSError as e:
        found[key] = type(e).__name__
print(json.dumps(found))
'''

HARNESS = r'''
import ctypes, json, os, sys
from lopd.eval import isolation
assert os.getuid() != 0 and os.geteuid() != 0
libc = ctypes.CDLL(None)
assert libc.prctl(3, 0, 0, 0, 0) == 1, "the grader must start dumpable, as a pod's process does"
assert isolation.deny_syscalls(("unshare",)), "cannot mimic the runtime's default seccomp profile"
from lopd.eval.interpreter import python_argv
from lopd.eval.sandbox import SandboxLimits, capabilities, run_program
src = sys.stdin.read()
r = run_program(python_argv(), limits=SandboxLimits(wall_s=10, cpu_s=5, memory_mb=512),
                files={"main.py": src.encode()})
print(json.dumps({"caps": capabilities(), "status": r.status, "stdout": r.stdout.decode(),
                  "stderr": r.stderr.decode()[-2000:], "isolation": r.isolation}))
'''


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to drop to an unprivileged uid with setpriv")
def test_sandbox_nonroot_no_secret_no_connection():
    """/proc/<ppid>/environ, every /proc/*/environ, the environment, the service-account token path,
    TCP to loopback, a Unix socket in a world-writable directory outside the temp dirs and an
    abstract one: nothing found, nothing reached."""
    ww = REPO / f".lopd-ww-{uuid.uuid4().hex[:12]}"
    ww.mkdir(mode=0o1777)
    os.chmod(ww, 0o1777)
    abstract = f"lopd-{uuid.uuid4().hex}"
    servers = [recording_listener(socket.AF_INET, ("127.0.0.1", 0)), recording_listener(socket.AF_UNIX, str(ww / "s")),
               recording_listener(socket.AF_UNIX, "\0" + abstract)]
    os.chmod(ww / "s", 0o777)
    try:
        src = HOSTILE.replace("@PORT@", str(servers[0][0].getsockname()[1])) \
            .replace("@UNIX@", repr(str(ww / "s"))).replace("@ABSTRACT@", repr(abstract)) \
            .replace("@SECRET@", repr(SECRET.encode()))
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", "/usr/bin/python3", "-c", HARNESS],
            input=src, capture_output=True, text=True, timeout=60, cwd="/",
            env={"AWS_SECRET_ACCESS_KEY": SECRET, "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["caps"]["network"] == "none" and not out["caps"]["root"], out["caps"]
        assert out["status"] == "ok", out
        found = json.loads(out["stdout"])
        assert SECRET not in proc.stdout
        assert not any("AWS" in k or "SECRET" in k for k in found["env"]), found
        assert found["proc"] == [] and found["token"] is None, found
        assert {found[k] for k in ("tcp", "unix", "abstract")} == {"PermissionError"}, found
        assert out["isolation"]["network"] == "seccomp" and out["isolation"]["seccomp"]
        assert [got for _, got, _ in servers] == [[], [], []]
    finally:
        for srv, _, stop in servers:
            stop.set()
            srv.close()
        shutil.rmtree(ww, ignore_errors=True)


UNIX_CLIENT = ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect({path!r})\n"
               "s.sendall(b'leak')\nprint(int(input()) * 2)\n")


def test_sandbox_refuses_unix_socket_in_any_world_writable_dir():
    """A listening Unix socket in a world-writable directory that is not a temp dir (so no private
    mount covers it) is refused too, whoever runs the grader."""
    from lopd.eval.interpreter import python_argv
    from lopd.eval.sandbox import SandboxLimits, run_program

    ww = REPO / f".lopd-ww-{uuid.uuid4().hex[:12]}"
    ww.mkdir()
    os.chmod(ww, 0o1777)
    srv, got, stop = recording_listener(socket.AF_UNIX, str(ww / "s"))
    os.chmod(ww / "s", 0o777)
    try:
        r = run_program(python_argv(), stdin=b"21\n", limits=SandboxLimits(wall_s=5, cpu_s=2, memory_mb=256),
                        files={"main.py": UNIX_CLIENT.format(path=str(ww / "s")).encode()})
        assert r.status == "exit" and b"PermissionError" in r.stderr, r
        assert got == []
    finally:
        stop.set()
        srv.close()
        shutil.rmtree(ww, ignore_errors=True)


@pytest.mark.parametrize("flag, want", [("1", "0"), ("", "1")])
def test_sandbox_nonroot_stage_processes_are_undumpable(flag, want):
    """With LOPD_UNDUMPABLE=1 (eval pods) any process importing the stage harness (the stage itself,
    the engines and grader workers it spawns) is non-dumpable: its environ is out of a graded
    program's reach even where the two share a uid."""
    code = "import ctypes, lopd.stage; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "LOPD_UNDUMPABLE": flag}, check=True).stdout
    assert out.strip() == want

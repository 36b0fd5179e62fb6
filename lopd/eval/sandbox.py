"""Run one untrusted program in a contained child process.

Every run gets:

- **a fresh working directory** (``mkdtemp``, mode 0700, owned by the sandbox uid), removed
  afterwards;
- **private temp directories**: a mount namespace with a fresh tmpfs over ``/tmp``,
  ``/var/tmp`` and ``/dev/shm`` (:mod:`lopd.eval.isolation`), so the host's Unix sockets and
  files there are out of reach and whatever the program writes there vanishes with it;
- **an empty environment** (no credentials, no proxies, no ``AWS_*``);
- **its own session / process group**, killed as a whole on timeout;
- **resource limits**: CPU seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``),
  processes (``RLIMIT_NPROC``), file size (``RLIMIT_FSIZE``, which also caps stdout and
  stderr: they go to files), open files, no core dumps; plus a wall-clock limit;
- **its own unprivileged uid** when the grader runs as root: ``setuid`` to
  ``UID_BASE + pid`` — a uid nothing else uses. ``RLIMIT_NPROC`` is only enforced for
  non-root users and counts per uid, so a private uid makes the process limit real and
  per-run (a fork bomb in one run cannot starve a parallel one); it also means the program
  cannot signal the grader, read root-only files or write outside world-writable places. After
  every run a reaper with that uid sends ``kill(-1, SIGKILL)`` until nothing is left, so
  processes that escaped the process group (``setsid``, double fork) die too;
- **no network**: a new network namespace (``unshare(CLONE_NEWNET)``: only a down loopback);
- **no sockets, no peeking at other processes**: a seccomp filter
  (:func:`lopd.eval.isolation.deny_syscalls`) refuses ``socket()``, ``io_uring``, ``ptrace``,
  ``process_vm_readv`` and the like. It needs no privilege, so it holds in a non-root pod with
  every capability dropped; it also keeps the program off ``AF_UNIX`` sockets anywhere (in any
  world-writable directory, abstract ones), which no network namespace covers;
- **a grader that cannot be read**: the process calling :func:`run_program` makes itself
  non-dumpable (``PR_SET_DUMPABLE`` 0), so a program of the same uid cannot read its
  ``/proc/<pid>/environ`` or memory (where credentials of the pod live).

Fallbacks, where the kernel or container forbids a step (all recorded in the result's
``isolation`` field, and :func:`capabilities` reports them up front):

- not root: no uid switch; the program runs as the grader's user. ``RLIMIT_NPROC`` then
  counts the grader's own processes too, so it is set to (current count + ``max_procs``);
  processes that left the process group are found because grader workers are child
  subreapers (:func:`enable_subreaper`): whatever is still a child of the worker after a run
  is killed. Files the program wrote to world-writable places outside its private temp
  directories are not cleaned up, and the program could signal the grader's other processes
  of the same uid: run eval pods' grader as root inside the pod (it drops to a private uid
  per program) when you can.
- ``unshare(CLONE_NEWNET)`` refused (no CAP_SYS_ADMIN): a user namespace plus network
  namespace (``CLONE_NEWUSER | CLONE_NEWNET``) is tried; in that case the program's own uid
  is mapped into it, so it can write to its private temp directories. If that is refused too
  (the container runtimes' default seccomp profile, ``kernel.unprivileged_userns_clone=0``),
  the seccomp filter alone keeps the program off the network (``isolation.network`` is
  ``"seccomp"``); only where no filter can be installed either does it run with the host
  network (``"none"``), which ``SandboxLimits.require_network_isolation=True`` turns into an
  error. On Kubernetes the chart also gives eval pods a NetworkPolicy (DNS and the store only).
- mount namespace or tmpfs refused: the program sees the host's temp directories (and can
  reach Unix sockets there) and ``isolation.tmp`` is ``"shared"``. As root, every file and
  directory its private uid owns anywhere below them is removed after the run (found by
  owner at any depth, symlinks removed but never followed); without root nothing is.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lopd import LopdError
from lopd.eval import isolation, reaper
from lopd.eval.isolation import capabilities
from lopd.eval.reaper import enable_subreaper

__all__ = ["RunResult", "SandboxError", "SandboxLimits", "capabilities", "enable_subreaper", "run_program"]
UID_BASE = 1_500_000


class SandboxError(LopdError):
    """The sandbox itself cannot run (not a verdict on the program)."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    """Wall-clock limit; the process group is killed when it passes."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address space in MiB (RLIMIT_AS)."""
    max_procs: int = 32
    """Processes / threads the program may have at once (RLIMIT_NPROC)."""
    output_bytes: int = 4 << 20
    """Largest stdout, stderr or any written file (RLIMIT_FSIZE)."""
    max_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    require_network_isolation: bool = False
    """Raise instead of running with the host network when neither a namespace nor the seccomp
    filter can be set up."""


@dataclass
class RunResult:
    status: str
    """ok (exit 0) | exit (non-zero exit) | signal | timeout | cpu_limit | memory_limit | output_limit."""
    returncode: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    cpu_s: float
    isolation: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- child setup


def _setrlimits(lim: SandboxLimits, nproc: int) -> None:
    mem = lim.memory_mb << 20
    for res, val in ((resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (lim.output_bytes, lim.output_bytes)),
                     (resource.RLIMIT_NOFILE, (lim.max_files, lim.max_files)), (resource.RLIMIT_CORE, (0, 0)),
                     (resource.RLIMIT_NPROC, (nproc, nproc))):
        resource.setrlimit(res, val)


def _count_my_processes() -> int:
    """Processes of this real uid (from ``status``: a non-dumpable one's /proc dir is root's)."""
    uid = str(os.getuid()).encode()
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status", "rb") as f:
                    line = next((ln for ln in f if ln.startswith(b"Uid:")), b"")
            except OSError:
                continue
            if line.split()[1:2] == [uid]:
                n += 1
    return n


def _make_preexec(lim: SandboxLimits, workdir: str, as_root: bool, net_flags: int, private_tmp: bool,
                  status_w: int):
    """The function run in the forked child before exec (as root when the grader is root).

    It reports what it set up as three bytes on ``status_w``: network (``s`` netns, ``u``
    userns, ``n`` none), temp dirs (``p`` private, ``h`` the host's) and the seccomp filter
    (``f`` installed, ``-`` not).
    """

    def setup() -> None:  # runs in the child: keep to plain syscalls
        code = b"n"
        if net_flags and isolation.unshare(net_flags):
            code = b"u" if net_flags & isolation.CLONE_NEWUSER else b"s"
        tmp = b"h"
        if private_tmp and (code != b"u" or isolation.map_own_ids()) \
                and isolation.private_temp_dirs(workdir, lim.memory_mb):
            tmp = b"p"
        os.write(status_w, code + tmp)
        if as_root:
            uid = UID_BASE + os.getpid()
            os.chown(workdir, uid, uid)
            _setrlimits(lim, lim.max_procs)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        else:
            _setrlimits(lim, _count_my_processes() + lim.max_procs)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.write(status_w, b"f" if isolation.deny_syscalls() else b"-")
        os.close(status_w)

    return setup


def _read_capped(path: Path, cap: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(cap)
    except OSError:
        return b""


# --------------------------------------------------------------------------- run


def run_program(argv: list[str], stdin: bytes = b"", limits: SandboxLimits = SandboxLimits(),
                files: dict[str, bytes] | None = None) -> RunResult:
    """Run ``argv`` (e.g. ``[sys.executable, "-I", "main.py"]``) in the sandbox.

    ``files`` are written into the fresh working directory first (``main.py`` …); ``stdin``
    is fed from a file. Never raises for anything the program does; :class:`SandboxError`
    only when network isolation is required but unavailable.
    """
    caps = capabilities()
    reaper.make_undumpable()
    if limits.require_network_isolation and caps["network"] == "none" and not caps["seccomp"]:
        raise SandboxError("sandbox: no network namespace can be created here and isolation is required")
    net_flags = {"netns": isolation.CLONE_NEWNET,
                 "userns": isolation.CLONE_NEWUSER | isolation.CLONE_NEWNET}.get(caps["network"], 0)
    base = os.environ.get("LOPD_SANDBOX_DIR") or None
    workdir = tempfile.mkdtemp(prefix="lopd-sbx-", dir=base)
    io_dir = tempfile.mkdtemp(prefix="lopd-sbx-io-", dir=base)  # grader-only: stdin/stdout/stderr files
    try:
        for name, data in (files or {}).items():
            p = Path(workdir) / name
            p.write_bytes(data)
            p.chmod(0o644)
        Path(io_dir, "stdin").write_bytes(stdin)
        r_status, w_status = os.pipe()
        t0 = time.monotonic()
        with open(Path(io_dir, "stdin"), "rb") as fin, open(Path(io_dir, "stdout"), "wb") as fout, \
                open(Path(io_dir, "stderr"), "wb") as ferr:
            proc = subprocess.Popen(
                argv, cwd=workdir, env={}, stdin=fin, stdout=fout, stderr=ferr, close_fds=True,
                pass_fds=(w_status,), start_new_session=True,
                preexec_fn=_make_preexec(limits, workdir, caps["root"], net_flags, caps["tmp"] == "private",
                                         w_status))
        os.close(w_status)
        codes = b""
        while len(codes) < 3 and (chunk := os.read(r_status, 3 - len(codes))):
            codes += chunk
        os.close(r_status)
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

        timer = threading.Timer(limits.wall_s, on_timeout)
        timer.start()
        try:
            _, wstatus, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(wstatus)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group
        except OSError:
            pass
        uid = UID_BASE + proc.pid
        if caps["root"]:
            reaper.reap_uid(uid)
            reaper.reap_zombies(uid)
            if codes[1:2] != b"p":
                reaper.remove_owned(uid, tuple(isolation.temp_dirs()))
        elif reaper.is_subreaper():
            reaper.kill_my_children()
        cpu = ru.ru_utime + ru.ru_stime
        out_full = Path(io_dir, "stdout").stat().st_size >= limits.output_bytes
        stdout = _read_capped(Path(io_dir, "stdout"), limits.output_bytes)
        stderr = _read_capped(Path(io_dir, "stderr"), 65536)
        rc = proc.returncode
        if timed_out.is_set():
            status = "timeout"
        elif rc == 0 and out_full:
            status = "output_limit"
        elif rc == 0:
            status = "ok"
        elif rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and cpu >= 0.9 * limits.cpu_s):
            status = "cpu_limit"
        elif rc == -signal.SIGXFSZ or (rc != 0 and (out_full or b"File too large" in stderr[-4096:])):
            status = "output_limit"
        elif any(m in stderr[-4096:] for m in (b"MemoryError", b"Cannot allocate memory", b"bad_alloc")):
            status = "memory_limit"
        elif rc < 0:
            status = "signal"
        else:
            status = "exit"
        network = {b"s": "netns", b"u": "userns"}.get(codes[:1], "seccomp" if codes[2:3] == b"f" else "none")
        setup = {"uid": uid if caps["root"] else os.getuid(), "network": network,
                 "tmp": "private" if codes[1:2] == b"p" else "shared", "seccomp": codes[2:3] == b"f"}
        return RunResult(status, rc, stdout, stderr, wall, cpu, setup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)

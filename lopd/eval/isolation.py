"""Namespaces for a sandboxed program: a private network and a private view of the temp dirs.

The functions here run in the forked child before ``exec`` (see
:func:`lopd.eval.sandbox.run_program`), so they keep to plain syscalls through ``ctypes``;
:func:`capabilities` probes once, in throwaway children, what this machine allows.

- **network**: ``unshare(CLONE_NEWNET)`` (root), else a user namespace plus a network
  namespace; only a down loopback is left, so nothing on or off the host is reachable by IP.
- **temp dirs** (``/tmp``, ``/var/tmp``, ``/dev/shm``): a network namespace does not cover
  path-based ``AF_UNIX`` sockets, and a program can leave files anywhere below a
  world-writable directory. So the child also gets a mount namespace
  (``unshare(CLONE_NEWNS)``, with every mount made ``MS_PRIVATE`` so nothing propagates back
  to the host) and a fresh, size-capped tmpfs over each of those directories: host sockets
  and files there are out of sight, and whatever the program writes there disappears with
  the namespace when its last process dies. A working directory that lives under one of them
  is bind-mounted back at the same path.
- **system calls** (:func:`deny_syscalls`): a seccomp filter, which any process may install
  on itself once ``no_new_privs`` is set (no capability, no namespace; allowed by the default
  seccomp profiles of container runtimes). The sandbox refuses ``socket()`` (so no network and
  no ``AF_UNIX`` socket anywhere: the ones in world-writable directories outside the private
  temp dirs, abstract ones, the host's; ``socketpair()`` stays, it reaches nothing),
  ``io_uring`` (which could open sockets past the filter), ``ptrace`` and
  ``process_vm_readv/writev`` (the memory of other processes of the same uid), ``bpf``,
  ``perf_event_open`` and the kernel keyrings. The filter is kept across ``exec`` and
  inherited by every child, so it holds where no namespace can be made.
"""

from __future__ import annotations

import ctypes
import os

from lopd.eval.reaper import libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
TMPFS_INODES = 4096


def unshare(flags: int) -> bool:
    return libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None = None) -> bool:
    return libc.mount(source, os.fsencode(target), fstype, ctypes.c_ulong(flags), data) == 0


def map_own_ids() -> bool:
    """In a fresh user namespace, map this process's own uid and gid to themselves.

    Without a mapping the process is "nobody" inside and cannot create files on a tmpfs the
    namespace mounts; with it, it is its own unprivileged uid, so it loses its namespace
    capabilities at ``exec`` and cannot undo the mounts.
    """
    uid, gid = os.getuid(), os.getgid()
    # a non-dumpable process's /proc/self files are root's: dumpable just for these writes
    undumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    if undumpable:
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    except OSError:
        return False
    finally:
        if undumpable:
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return True


def temp_dirs() -> list[str]:
    """The world-writable temp directories that exist here, each once (``/var/tmp`` may be a link)."""
    out: list[str] = []
    for d in WORLD_WRITABLE:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in out:
            out.append(real)
    return out


def private_temp_dirs(workdir: str, size_mb: int) -> bool:
    """In a new mount namespace, put a fresh tmpfs over every temp dir (call in the child).

    ``workdir`` (the process's current directory) is bind-mounted back at its path when it
    lives under one of them. All or nothing: on any failure what was mounted is detached again
    and False returned, leaving the host's view (the caller then cleans up by uid).
    """
    if not unshare(CLONE_NEWNS):
        return False
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE):
        return False
    done: list[str] = []
    real_workdir = os.path.realpath(workdir)
    opts = f"mode=1777,size={size_mb}m,nr_inodes={TMPFS_INODES}".encode()
    ok = True
    for d in temp_dirs():
        if not _mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, opts):
            ok = False
            break
        done.append(d)
        if real_workdir.startswith(d.rstrip("/") + "/"):
            try:
                os.makedirs(real_workdir, mode=0o700)
            except OSError:
                ok = False
                break
            if not _mount(b".", real_workdir, None, MS_BIND):
                ok = False
                break
            done.append(real_workdir)
            os.chdir(real_workdir)
    if not ok:
        for m in reversed(done):
            libc.umount2(os.fsencode(m), MNT_DETACH)
        os.chdir(workdir)
    return ok


# --------------------------------------------------------------------------- seccomp

# (audit arch, {syscall name: number}) for the machines images are built for.
_ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
                            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 321,
                            "perf_event_open": 298, "add_key": 248, "request_key": 249, "keyctl": 250,
                            "unshare": 272}),
    "aarch64": (0xC00000B7, {"socket": 198, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
                             "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
                             "perf_event_open": 241, "add_key": 217, "request_key": 218, "keyctl": 219,
                             "unshare": 97}),
}
SANDBOX_DENIED = ("socket", "io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace", "process_vm_readv",
                  "process_vm_writev", "bpf", "perf_event_open", "add_key", "request_key", "keyctl")
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_X32 = 0x40000000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(names: tuple[str, ...], machine: str | None = None) -> list[tuple[int, int, int, int]] | None:
    """The BPF program that fails ``names`` with EPERM and allows the rest; None on an unknown arch.

    Another ABI than the machine's (i386 on x86_64, x32) is killed: its syscall numbers differ.
    """
    arch = _ARCHES.get(machine or os.uname().machine)
    if arch is None:
        return None
    audit, table = arch
    nrs = [table[n] for n in names]
    prog = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, audit), (_RET, 0, 0, _KILL), (_LD_ABS, 0, 0, 0)]
    if audit == _ARCHES["x86_64"][0]:
        prog += [(_JGE, 0, 1, _X32), (_RET, 0, 0, _KILL)]
    for i, nr in enumerate(nrs):  # jump to the EPERM return after the allow
        prog.append((_JEQ, len(nrs) - i, 0, nr))
    prog += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO | 1)]
    return prog


def deny_syscalls(names: tuple[str, ...] = SANDBOX_DENIED) -> bool:
    """Install a seccomp filter on this process (and all it starts) failing ``names`` with EPERM.

    Needs no privilege (``no_new_privs`` is set first); False where the kernel or arch does not
    allow it. Runs in the forked child before ``exec``: plain syscalls only.
    """
    prog = seccomp_program(names)
    if prog is None:
        return False
    arr = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), arr)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


# --------------------------------------------------------------------------- capabilities

_CAPS: dict | None = None


def _probe(setup) -> bool:
    """Run ``setup`` in a throwaway child; True when it returns True there."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if setup() else 1)
        except BaseException:
            os._exit(1)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st) == 0


def capabilities() -> dict:
    """What this machine allows, probed once: ``{"root": bool, "network": "netns"|"userns"|"none",
    "tmp": "private"|"shared", "seccomp": bool}``."""
    global _CAPS
    if _CAPS is None:
        root = os.geteuid() == 0
        network = "none"
        for flags, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns")):
            if not (name == "userns" and root) and _probe(lambda f=flags: unshare(f)):
                network = name
                break

        def tmp_setup() -> bool:
            if network == "userns" and not (unshare(CLONE_NEWUSER | CLONE_NEWNET) and map_own_ids()):
                return False
            return private_temp_dirs("/", 1)

        private = _probe(tmp_setup)
        _CAPS = {"root": root, "network": network, "tmp": "private" if private else "shared",
                 "seccomp": _probe(deny_syscalls)}
    return _CAPS

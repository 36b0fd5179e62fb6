"""Cleaning up after a sandboxed program: kill every process it left, reap zombies, remove files.

- as root, each program has a private uid (see :mod:`lopd.eval.sandbox`), so "everything it
  left" is "every process of that uid": :func:`reap_uid` kills them all with ``kill(-1)``
  from a helper that takes the uid, and :func:`remove_owned` deletes that uid's files at any
  depth below the world-writable directories (where they are not private to the program);
- grader workers are child subreapers (:func:`enable_subreaper`), so orphans come back to
  them and are waited for (:func:`reap_zombies`), and, without root, whatever is still a
  child of the worker after a run is a leftover of it (:func:`kill_my_children`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import time

libc = ctypes.CDLL(None, use_errno=True)
_libc = libc


def _procs_of(uid: int):
    """(pid, /proc/<pid>/stat fields after the command name) of every process ``uid`` owns."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}").st_uid != uid:
                continue
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields:
            yield int(d), fields


def live_pids(uid: int) -> list[int]:
    """Processes of ``uid`` other than this one that are not zombies (zombies hold nothing)."""
    return [pid for pid, fields in _procs_of(uid) if fields[0] != b"Z" and pid != os.getpid()]


def reap_uid(uid: int) -> None:
    """Kill every process of ``uid`` (setsid / double-fork escapees included).

    A forked helper takes the uid and sends ``kill(-1, SIGKILL)`` (every process it may
    signal, i.e. exactly that uid's) until no live process of the uid is left.
    """
    if not live_pids(uid):
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(2000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    os._exit(0)
                if not live_pids(uid):
                    os._exit(0)
                time.sleep(0.002)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)


PR_SET_CHILD_SUBREAPER = 36
PR_SET_DUMPABLE = 4


_SUBREAPER = False


def is_subreaper() -> bool:
    return _SUBREAPER


def enable_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (call in grader workers only).

    Killed grandchildren of a program are then re-parented here rather than to PID 1 (which
    in a container may be a process that never reaps), and :func:`run_program` waits for
    them by pid, so no zombies pile up. Without root it is also how escapees are found: every
    child of a subreaper worker after a run is a leftover of that run, and is killed.
    """
    global _SUBREAPER
    _SUBREAPER = _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _SUBREAPER


def make_undumpable() -> bool:
    """``PR_SET_DUMPABLE`` 0 for this process (kept across ``fork``, reset by ``exec``).

    Its ``/proc/<pid>`` files then belong to root and another process of the same uid cannot
    read its ``environ`` or ``mem`` nor attach to it: how a grader keeps the credentials it
    inherited from the programs it runs, which share its uid where it is not root.
    """
    return _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def kill_my_children() -> None:
    """Non-root fallback in a subreaper worker: kill and reap every child process of ours."""
    me = os.getpid()
    for _ in range(50):
        kids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                kids.append((int(d), fields[0]))
        if not kids:
            return
        for pid, state in kids:
            if state != b"Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.002)


def reap_zombies(uid: int) -> None:
    """waitpid() the zombies of ``uid`` that are our children (by pid: never anyone else's)."""
    me = os.getpid()
    for pid, fields in _procs_of(uid):
        try:
            if fields[0] == b"Z" and int(fields[1]) == me:
                os.waitpid(pid, os.WNOHANG)
        except (OSError, IndexError, ValueError):
            continue


def remove_owned(uid: int, dirs: tuple[str, ...]) -> None:
    """Delete everything ``uid`` owns anywhere below ``dirs`` (the world-writable temp trees).

    Found by owner, not by place: a program can write deep inside world-writable directories
    it did not create. Only directories others may enter are descended into (the uid cannot
    have reached anything else); symlinks are removed, never followed, and a directory the uid
    owns goes as a whole (``shutil.rmtree`` does not follow links either).
    """
    stack = list(dirs)
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if st.st_uid == uid:
                    if is_dir:
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        os.unlink(e.path)
                elif is_dir and st.st_mode & stat.S_IXOTH:
                    stack.append(e.path)
            except OSError:
                pass

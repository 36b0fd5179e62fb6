"""What a stage process leaves for its pod's operators: its log kept in the store beside its
outputs, its one-line failure in the termination log, and (where untrusted code runs) its
memory and environment unreadable to processes of the same uid.

Pods (and their logs) go away after the Job's TTL; a stage started with ``LOPD_LOG_TO_STORE=1``
(the chart sets it) copies everything written to its stdout and stderr (its children's too: they
inherit the descriptors) into a local file while still passing it through to the container log,
and uploads that file to ``<store>/runs/<run>/<stage>/logs/<shard>.log`` when the process exits,
failing or not (:func:`lopd.layout.stage_log_key`). ``lopd logs`` reads it there when the pods
are gone (:func:`stored_logs`).
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
import threading
from collections.abc import Callable

from lopd.layout import stage_log_key, stage_prefix
from lopd.store import Store


def tee_to_store(store: Store, key: str) -> Callable[[], None]:
    """Start copying fds 1 and 2 to a file; the returned function (also run at exit, once) stops
    the copy and uploads the file to ``key``. Upload errors are reported, never raised."""
    fd, path = tempfile.mkstemp(prefix="lopd-log-", suffix=".log")
    r, w = os.pipe()
    saved_out, saved_err = os.dup(1), os.dup(2)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        while chunk := os.read(r, 65536):
            os.write(saved_err, chunk)
            os.write(fd, chunk)

    t = threading.Thread(target=pump, name="lopd-log-tee", daemon=True)
    t.start()
    done = threading.Event()

    def finish() -> None:
        if done.is_set():
            return
        done.set()
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        t.join(timeout=5)  # children still holding the pipe must not block the exit
        os.close(fd)
        try:
            store.put_file(path, key)
        except Exception as e:  # noqa: BLE001 - the log is a convenience, the stage's result stands
            print(f"warning: could not upload the stage log to {store.url(key)}: {e}", file=sys.stderr)
        finally:
            os.unlink(path)

    atexit.register(finish)
    return finish


def log_name(shard_index: int, num_shards: int, training: bool) -> str:
    """``<i>-of-<n>`` for an inference shard, ``rank-<RANK>`` for a training process."""
    return f"rank-{os.environ.get('RANK', '0')}" if training else f"{shard_index}-of-{num_shards}"


def start_stage_log(store: Store, prefix: str, shard_index: int, num_shards: int, training: bool) -> None:
    """In the stage harness: tee this process's output to the store when ``LOPD_LOG_TO_STORE=1``."""
    if os.environ.get("LOPD_LOG_TO_STORE") == "1":
        tee_to_store(store, stage_log_key(prefix, log_name(shard_index, num_shards, training)))


def stored_logs(store: Store, run_id: str, stage: str) -> list[tuple[str, str]]:
    """(key, text) of every uploaded log of ``stage``, in name order."""
    prefix = stage_log_key(stage_prefix(run_id, stage)).rsplit("/", 1)[0]
    return [(o.key, store.read_bytes(o.key).decode("utf-8", "replace"))
            for o in sorted(store.list(prefix), key=lambda o: o.key) if o.key.endswith(".log")]


def termination_log(message: str) -> None:
    """Write ``message`` (one line) where Kubernetes reads a container's termination message:
    ``$LOPD_TERMINATION_LOG`` (the chart sets it), else ``/dev/termination-log`` when it exists."""
    path = os.environ.get("LOPD_TERMINATION_LOG") or "/dev/termination-log"
    if not os.path.exists(path) and not os.environ.get("LOPD_TERMINATION_LOG"):
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(" ".join(message.split())[:4000] + "\n")
    except OSError:
        pass


def undumpable_if_asked() -> None:
    """``LOPD_UNDUMPABLE=1`` (the chart sets it where untrusted code runs, the eval stage): this
    process and those it forks become non-dumpable, so a program of the same uid cannot read
    their ``/proc/<pid>/environ`` (the store credentials) or memory. Also run on import, so
    processes the stage spawns (inference engines, grader workers: they import the stage's
    main module) protect themselves too."""
    if os.environ.get("LOPD_UNDUMPABLE") == "1":
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE

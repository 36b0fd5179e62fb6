"""Load DeepSpeed's CPU shared-memory comm op: built once per environment, visibly, and never hung.

**Once per environment.** torch JIT-builds the op with the ``ninja`` found on ``PATH`` into
``$TORCH_EXTENSIONS_DIR/<op>``. Two ninja versions (a pip wheel in the virtualenv and the
system's) keep incompatible build logs, so processes that find different ones rebuild the op
for each other, 1–3 minutes every time. Unless ``TORCH_EXTENSIONS_DIR`` is set (then it is used
as it is), lopd points it at a directory under torch's default root keyed by the Python, torch
and DeepSpeed versions and the ninja found (path and version): :func:`build_root`. Each
environment then builds once and reuses its build.

**Visibly.** The build is silent and long, so one structured line (:func:`lopd.progress.log`)
says when it starts (``building_cpu_op``) and one when it is done, with its duration
(``built_cpu_op``); a process that waits for another one's build says so
(``waiting_for_cpu_op``).

**Never hung.** torch builds and loads the op behind a lock *file* (``<build dir>/lock``,
torch's FileBaton). A process killed while holding it leaves the file behind, and every later
process that needs the op then waits for it forever. Here every lopd process loads the op
while holding an ``fcntl`` lock beside the build directory: the kernel drops that lock when its
holder dies, so whoever holds it knows a lock file left in the build directory is stale and
removes it. DeepSpeed caches loaded ops, so its own load during ``init_distributed`` reuses
this one and never touches the file again. (Processes outside lopd that build the same op in
the same directory are not covered.)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lopd.progress import log as progress_log

log = logging.getLogger(__name__)
SHM_OP = "ShareMemCommBuilder"


def _ninja() -> tuple[str, str]:
    """(real path, version) of the ``ninja`` torch will run; ``("none", "none")`` when there is none."""
    path = shutil.which("ninja")
    if path is None:
        return "none", "none"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return os.path.realpath(path), version


def build_root() -> Path:
    """The extensions root for this environment: ``TORCH_EXTENSIONS_DIR`` when set, else a
    directory under torch's default root named by the versions that decide the build."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import deepspeed
    import torch
    from torch.utils import cpp_extension

    ninja_path, ninja_version = _ninja()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-ds{deepspeed.__version__}" \
          f"-ninja{ninja_version}"
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
    digest = hashlib.sha256(f"{tag}|{ninja_path}".encode()).hexdigest()[:8]
    return Path(cpp_extension.get_default_build_root()) / f"lopd-{tag}-{digest}"


def load_shm_comm_op() -> bool:
    """Load the op (building it if needed) under the lock; returns whether it is usable here.

    Sets ``TORCH_EXTENSIONS_DIR`` to :func:`build_root` when unset, so DeepSpeed's own loads
    (and child processes) use the same build.
    """
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(SHM_OP)
    if builder is None or not builder.is_compatible():
        return False
    os.environ["TORCH_EXTENSIONS_DIR"] = str(build_root())
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir.parent / f"{builder.name}.lopd-lock", "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress_log("waiting_for_cpu_op", op=builder.name, build_dir=str(build_dir))
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if its holder dies
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing a stale torch extension lock left by a killed process: %s", stale)
            stale.unlink(missing_ok=True)
        building = not any(build_dir.glob(f"{builder.name}*.so"))
        if building:
            progress_log("building_cpu_op", op=builder.name, build_dir=str(build_dir), ninja=" ".join(_ninja()))
        t0 = time.monotonic()
        builder.load(verbose=False)
        if building:
            progress_log("built_cpu_op", op=builder.name, seconds=round(time.monotonic() - t0, 1))
    return True

"""Load DeepSpeed's CPU shared-memory comm op so that a killed run cannot hang the next one.

torch JIT-builds and loads the op behind a lock *file* (``<build dir>/lock``, torch's
FileBaton). A process killed while holding it leaves the file behind, and every later process
that needs the op then waits for it forever (seen when a local ``lopd pipeline`` was killed at
that moment). Here every lopd process loads the op while holding an ``fcntl`` lock beside the
build directory: the kernel drops that lock when its holder dies, so whoever holds it knows a
lock file left in the build directory is stale and removes it. DeepSpeed caches loaded ops, so
its own load during ``init_distributed`` reuses this one and never touches the file again.
(Processes outside lopd that build the same op in the same directory are not covered.)
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

log = logging.getLogger(__name__)
SHM_OP = "ShareMemCommBuilder"


def load_shm_comm_op() -> bool:
    """Load the op (building it if needed) under the lock; returns whether it is usable here."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(SHM_OP)
    if builder is None or not builder.is_compatible():
        return False
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir.parent / f"{builder.name}.lopd-lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing a stale torch extension lock left by a killed process: %s", stale)
            stale.unlink(missing_ok=True)
        builder.load(verbose=False)
    return True

"""Model directories as a careless user leaves them: a file rewritten in place."""

from __future__ import annotations

import os
from pathlib import Path


def overwrite_in_place(path: Path, offset: int = 64) -> None:
    """Flip 4 bytes of ``path`` without changing its size, inode or mtime (only its ctime moves)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(-offset, os.SEEK_END)
        old = f.read(4)
        f.seek(-offset, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (st.st_size, st.st_ino, st.st_mtime_ns)

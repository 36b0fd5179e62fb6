"""Progress that people and machines can both read: one JSON object per line on stderr (what a
pod's log holds), or a tqdm bar when stderr is a terminal."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log(event: str, **fields: Any) -> None:
    """One structured progress line on stderr (``{"t": ..., "event": ..., ...}``)."""
    print(json.dumps({"t": round(time.time(), 3), "event": event, **fields}, default=str), file=sys.stderr,
          flush=True)


class Progress:
    """``total`` units of work: a tqdm bar in a terminal, else one ``event`` log line per update
    (``what``, ``done``, ``total`` and the update's fields)."""

    def __init__(self, total: int, desc: str, event: str, initial: int = 0):
        self.tqdm = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, initial=initial, desc=desc)
        self.desc, self.event, self.total, self.n = desc, event, total, initial

    def update(self, k: int = 1, postfix: dict[str, Any] | None = None, **fields: Any) -> None:
        """``k`` more units done; ``postfix`` shows on the bar, ``fields`` go into the log line."""
        self.n += k
        if self.tqdm is not None:
            self.tqdm.update(k)
            if postfix:
                self.tqdm.set_postfix(postfix)
        else:
            log(self.event, what=self.desc, done=self.n, total=self.total, **fields)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()

"""The pieces of a shard's resumable parts that need no stage context: a finished :class:`Part`,
:class:`Lazy` (an engine built on first use), item-key hashing, per-prompt sampling seeds, and
the empty-output rule.

A stage that produces no rows at all (every input skipped) must not publish: the next stage
would find an empty dataset. :func:`require_rows` turns that into one line naming the stage and
its counters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lopd import LopdError
from lopd.manifest import FileEntry


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """A per-prompt sampling seed from the recipe seed and the prompt id: the same prompt gets the
    same samples whichever shard, part or batch it lands in (and after a resume)."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class EmptyOutputError(LopdError):
    """A stage produced no rows; nothing is published."""


@dataclass
class Part:
    """A finished part of a shard: its data file (relative to the shard prefix), metrics and row
    count (None when the part's marker predates row counts)."""

    index: int
    file: FileEntry
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None


class Lazy:
    """Builds a value (e.g. an inference engine) on first use, so a resumed shard whose parts
    are all done never starts an engine; ``close()`` releases it if it was built."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory, self._value = factory, None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._factory()
        return self._value

    def close(self) -> None:
        if self._value is not None and hasattr(self._value, "close"):
            self._value.close()
        self._value = None


def keys_sha256(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def total_rows(parts: Sequence[Part]) -> int | None:
    """Rows across ``parts``; None when any part's count is unknown."""
    if any(p.rows is None for p in parts):
        return None
    return sum(p.rows or 0 for p in parts)


def require_rows(stage: str, rows: int | None, metrics: dict[str, Any], where: str) -> None:
    """Raise :class:`EmptyOutputError` when ``rows`` is 0 (unknown counts pass)."""
    if rows != 0:
        return
    counts = ", ".join(f"{k}={v}" for k, v in sorted(metrics.items())
                       if isinstance(v, int) and not isinstance(v, bool) and k not in ("rows", "parts"))
    raise EmptyOutputError(f"{stage} produced no rows at {where}: every input was skipped or yielded nothing"
                           f"{f' ({counts})' if counts else ''}; nothing published")

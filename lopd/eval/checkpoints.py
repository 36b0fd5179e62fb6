"""The checkpoints an ``eval`` stage compares: ``eval.checkpoints`` or, when empty, the run's own.

Each entry of ``eval.checkpoints`` is ``[label=]reference``: a store URI or local directory of a
published checkpoint (it must carry a ``MANIFEST.json``) or a hub model id. Labels default to
the reference's last path component and are made unique (``name``, ``name-2``, ...). With no
entries, the run's published ``sft`` and ``opd`` checkpoints are used (``opd``: the last Lightning
round's, ``opd-r<R>``, with ``opd.rounds: R``) (their ``final/`` when
the stage root has no manifest of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

from lopd.fingerprint import HUB_ID_RE
from lopd.layout import MANIFEST, stage_prefix
from lopd.manifest import has_manifest
from lopd.stage import StageError
from lopd.stages import instance, rounds
from lopd.store import is_store_uri, open_store


def _has_manifest(ref: str) -> bool:
    if is_store_uri(ref):
        return has_manifest(open_store(ref))
    return (Path(ref) / MANIFEST).is_file()


def checkpoint_refs(recipe) -> list[tuple[str, str]]:
    """(label, reference) of every checkpoint to evaluate; one-line errors name the entry."""
    cfg = recipe.eval
    if not cfg.checkpoints:
        root = recipe.store if "://" in recipe.store else f"file://{os.path.abspath(recipe.store)}"
        out = []
        for label, st in (("sft", "sft"), ("opd", instance("opd", rounds(recipe)))):  # opd: the last round's
            for sub in ("", "/final"):
                uri = f"{root.rstrip('/')}/{stage_prefix(recipe.run_id, st)}{sub}"
                if _has_manifest(uri):
                    out.append((label, uri))
                    break
        if not out:
            raise StageError("eval.checkpoints is empty and this run has no published sft or opd checkpoint")
        return out
    out, seen = [], set()
    for i, entry in enumerate(cfg.checkpoints):
        label, ref = entry.split("=", 1) if "=" in entry.split("://")[0] else (None, entry)
        is_hub = HUB_ID_RE.match(ref) and not is_store_uri(ref) and not Path(ref).exists()
        if not is_hub and not _has_manifest(ref):
            raise StageError(f"eval.checkpoints[{i}]: {ref!r} has no {MANIFEST} (not a published checkpoint)")
        label = label or Path(ref.rstrip("/")).name or f"ckpt{i}"
        base, n = label, 2
        while label in seen:
            label, n = f"{base}-{n}", n + 1
        seen.add(label)
        out.append((label, ref))
    return out

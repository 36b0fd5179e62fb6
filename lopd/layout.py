"""Where things live under a store root: the one place that spells store paths.

    runs/<run_id>/                                   a run (for a path store, also logs/ and repro/)
    runs/<run_id>/<stage>/MANIFEST.json              a stage's output exists iff its manifest does
    runs/<run_id>/<stage>/shards/<i>-of-<n>/         one shard of a sharded stage (own manifest)
    runs/<run_id>/<stage>/checkpoints/step-NNNNNN/   a training stage's resumable checkpoints
    runs/<run_id>/eval/report/                       the eval report (summary.json, report.md, ...)
    runs/<run_id>-teacher/sft                        the teacher a bootstrap section trains

Pure functions of names; nothing here touches a store. The local run directory (logs, repro
study) is ``runs/<run_id>`` under a path store, else under ``.`` (:func:`local_run_dir`).
"""

from __future__ import annotations

import re
from pathlib import Path

from lopd import LopdError

MANIFEST = "MANIFEST.json"

_SHARD_RE = re.compile(r"shards/(\d+)-of-(\d+)/" + re.escape(MANIFEST) + "$")
_STEP_RE = re.compile(r"checkpoints/step-(\d{6})/" + re.escape(MANIFEST) + "$")


# Defined here (not in lopd.manifest, which imports this module) because shard_prefix raises it;
# import it from lopd.manifest.
class ManifestError(LopdError):
    """A manifest is missing, malformed, or does not match the files it lists."""


def run_prefix(run_id: str) -> str:
    """``runs/<run_id>``: a run's directory."""
    return f"runs/{run_id}"


def stage_prefix(run_id: str, stage: str) -> str:
    """``runs/<run_id>/<stage>`` — where a stage's output lives under the store root."""
    return f"{run_prefix(run_id)}/{stage}"


def driver_prefix(run_id: str) -> str:
    """``runs/<run_id>/_driver``: the in-cluster pipeline driver's progress (``progress.json``)
    and cancel request (``cancel.json``); not a stage (a stage name cannot start with ``_``)."""
    return f"{run_prefix(run_id)}/_driver"


def stage_log_key(prefix: str, shard: str = "") -> str:
    """``<prefix>/logs/<shard or "all">.log``: a stage process's log, uploaded beside its outputs."""
    return f"{prefix.strip('/')}/logs/{shard or 'all'}.log"


def manifest_key(prefix: str = "") -> str:
    """``<prefix>/MANIFEST.json`` (just ``MANIFEST.json`` at the root)."""
    return f"{prefix.strip('/')}/{MANIFEST}" if prefix.strip("/") else MANIFEST


def shards_prefix(stage_prefix: str) -> str:
    """``<stage prefix>/shards``: where a sharded stage's shards live."""
    return f"{stage_prefix.strip('/')}/shards"


def shard_prefix(stage_prefix: str, index: int, count: int) -> str:
    """``<stage prefix>/shards/<index>-of-<count>``; raises ManifestError when out of range."""
    if not 0 <= index < count:
        raise ManifestError(f"shard index {index} out of range for {count} shards (0..{count - 1})")
    return f"{shards_prefix(stage_prefix)}/{index}-of-{count}"


def shard_of(key: str) -> tuple[int, int] | None:
    """(index, count) when ``key`` is a shard manifest (``.../shards/<i>-of-<n>/MANIFEST.json``)."""
    m = _SHARD_RE.search(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def checkpoints_prefix(stage_prefix: str) -> str:
    """``<stage prefix>/checkpoints``: a training stage's resumable checkpoints."""
    return f"{stage_prefix}/checkpoints"


def checkpoint_prefix(stage_prefix: str, step: int) -> str:
    """``<stage prefix>/checkpoints/step-NNNNNN``: the checkpoint after ``step`` optimizer steps."""
    return f"{checkpoints_prefix(stage_prefix)}/step-{step:06d}"


def checkpoint_step(key: str) -> int | None:
    """The step when ``key`` is a checkpoint manifest (``.../checkpoints/step-NNNNNN/MANIFEST.json``)."""
    m = _STEP_RE.search(key)
    return int(m.group(1)) if m else None


def report_prefix(eval_prefix: str) -> str:
    """``<eval stage prefix>/report``: the eval report, published with its own manifest."""
    return f"{eval_prefix}/report"


def teacher_run(run_id: str) -> str:
    """``<run_id>-teacher``: the run a bootstrap section trains the teacher in."""
    return f"{run_id}-teacher"


def teacher_sft_prefix(run_id: str) -> str:
    """``runs/<run_id>-teacher/sft``: the bootstrap teacher (what ``models.teacher.uri`` must name)."""
    return stage_prefix(teacher_run(run_id), "sft")


def local_run_dir(store: str, run_id: str) -> Path:
    """This machine's ``runs/<run_id>`` for logs and reports: under a path store (``store`` without
    a scheme), else under the working directory."""
    return Path(store if "://" not in store else ".") / run_prefix(run_id)


def run_logs_dir(run_dir: str | Path) -> Path:
    """``<run dir>/logs``: the stage logs of a local run (``<stage>.log``, ``bootstrap-<stage>.log``)."""
    return Path(run_dir) / "logs"


def repro_dir(run_dir: str | Path) -> Path:
    """``<run dir>/repro``: a repro study's directory (derived recipes, results.*) in a run's directory."""
    return Path(run_dir) / "repro"


__all__ = [
    "MANIFEST", "ManifestError", "checkpoint_prefix", "checkpoint_step", "checkpoints_prefix", "local_run_dir",
    "manifest_key",
    "report_prefix", "repro_dir", "run_logs_dir", "run_prefix", "shard_of", "shard_prefix", "shards_prefix",
    "stage_prefix", "teacher_run", "teacher_sft_prefix",
]

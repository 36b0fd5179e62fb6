"""The harness every stage entrypoint (``jobs/*.py``) uses: arguments, models, resumable parts, publish.

A stage's ``main()`` reads like the algorithm box::

    ctx = stage.start("sft-data", argv)              # parse (section from the registry); None = done
    teacher = ctx.resolve_model(ctx.recipe.models.teacher, "models.teacher.uri")
    prompts = ctx.shard_items(load_prompts(cfg.prompts))
    parts = ctx.run_parts(prompts, cfg.part_size, work, key=lambda p: p.prompt_id, schema=SFT_DATA)
    ctx.publish(parts, inputs=..., lineage=..., metrics=...)           # shard manifest, then stage manifest

and is wrapped by ``stage.entrypoint(main)`` which turns a :class:`lopd.LopdError` into one
line on stderr and exit code 2.

Arguments (the same for every stage, container and local runner alike): ``--recipe``,
``--set key=value`` (repeatable), ``--shard-index`` (default ``$JOB_COMPLETION_INDEX``, else
0), ``--num-shards`` (default the recipe section's ``shards``), ``--force``, ``--round`` (a
Lightning round's instance of precompute or opd, :mod:`lopd.rounds`; default 1).

Store layout: ``<store>/runs/<run_id>/<stage>/shards/<i>-of-<n>/`` holds the shard's
``part-NNNNN.parquet`` files, a ``parts/part-NNNNN.json`` marker per finished part (written
after its parquet, so a part exists iff its marker does) and, last, the shard's
``MANIFEST.json``, which lists the part files. When all ``n`` shard manifests exist the
stage manifest is written (:func:`lopd.manifest.finalize_shards`). A killed shard resumes
from its last complete part; a part's marker records the recipe hash and the hash of its
item keys, so a part made under another recipe or input is redone, not reused.

Re-running a stage whose manifest exists is a no-op unless ``--force`` (which removes the
stage manifest and this shard's outputs first).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.layout import manifest_key, shard_prefix, stage_prefix
from lopd.manifest import (
    FileEntry,
    InputRef,
    Manifest,
    ShardInfo,
    finalize_shards,
    has_manifest,
    manifest_bytes,
    now,
)
from lopd.models import ResolvedModel, resolve_model
from lopd.parts import EmptyOutputError, Lazy, Part, keys_sha256, prompt_seed, require_rows, total_rows
from lopd.podlog import start_stage_log, termination_log, undumpable_if_asked
from lopd.progress import Progress, log
from lopd.recipe import ModelSpec, Recipe, load_recipe
from lopd.stages import get as get_stage
from lopd.stages import instance
from lopd.stages import rounds as rounds_of
from lopd.store import Store, file_digest, open_store


class StageError(LopdError):
    """A stage cannot run as asked (bad shard, missing input or section; a model that cannot be
    resolved is :class:`lopd.models.ModelNotFoundError`)."""


# --------------------------------------------------------------------------- context


@dataclass
class StageContext:
    """Everything a stage entrypoint needs; made by :func:`start`."""

    stage: str
    recipe: Recipe
    section: Any
    store: Store
    shard_index: int
    num_shards: int
    force: bool
    workdir: Path
    round: int = 1  # the Lightning round this instance runs (``--round``; lopd.rounds)
    rounds: int = 1  # how many the recipe runs (opd.rounds in offline mode, else 1)

    @property
    def prefix(self) -> str:
        """``runs/<run_id>/<stage>``"""
        return stage_prefix(self.recipe.run_id, self.stage)

    @property
    def shard(self) -> str:
        """``runs/<run_id>/<stage>/shards/<i>-of-<n>``"""
        return shard_prefix(self.prefix, self.shard_index, self.num_shards)

    def resolve_model(self, ref: str | ModelSpec, field_name: str = "model") -> ResolvedModel:
        return resolve_model(ref, field_name)

    def shard_items(self, items: list) -> list:
        """This shard's contiguous slice of ``items`` (see :func:`lopd.data.prompts.shard_of`)."""
        from lopd.data.prompts import shard_of

        return shard_of(items, self.shard_index, self.num_shards)

    # -- parts

    def _part_names(self, name: str, i: int) -> tuple[str, str]:
        return f"{name}-{i:05d}.parquet", f"{self.shard}/parts/{name}-{i:05d}.json"

    def run_parts(self, items: list, part_size: int, work: Callable[[list, int], tuple[Any, dict[str, Any]]],
                  key: Callable[[Any], str], schema: Any, name: str = "part") -> list[Part]:
        """Process ``items`` in parts of ``part_size``; skip parts already finished; return all parts.

        ``work(part_items, part_index)`` returns ``(pyarrow.Table, metrics)``; the table is
        written with ``schema`` (zstd parquet) to ``<shard>/<name>-NNNNN.parquet``, then the
        marker ``<shard>/parts/<name>-NNNNN.json`` (file entry, metrics, recipe and item-key
        hashes). A part whose marker matches this recipe and these items is not redone.
        """
        from lopd.data.schemas import write_table

        n_parts = (len(items) + part_size - 1) // part_size
        parts: list[Part] = []
        recipe_sha = self.recipe.sha256()
        bar = Progress(n_parts, f"{self.stage} {name}", "part_done")
        for i in range(n_parts):
            chunk = items[i * part_size:(i + 1) * part_size]
            items_sha = keys_sha256([key(x) for x in chunk])
            fname, marker = self._part_names(name, i)
            done = self._read_marker(marker)
            if done and done.get("recipe_sha256") == recipe_sha and done.get("items_sha256") == items_sha:
                parts.append(Part(i, FileEntry(**done["file"]), done.get("metrics", {}), done.get("rows")))
                bar.update(1, resumed=True, part=i)
                continue
            table, metrics = work(chunk, i)
            local = self.workdir / fname
            write_table(table, local, schema)
            entry = FileEntry(path=fname, bytes=local.stat().st_size, digest=file_digest(local))
            self.store.put_file(local, f"{self.shard}/{fname}")
            self.store.write_json(marker, {"file": entry.model_dump(), "metrics": metrics, "items": len(chunk),
                                           "rows": table.num_rows, "recipe_sha256": recipe_sha,
                                           "items_sha256": items_sha})
            local.unlink()
            parts.append(Part(i, entry, metrics, table.num_rows))
            bar.update(1, resumed=False, part=i, **{k: v for k, v in metrics.items() if isinstance(v, int)})
        bar.close()
        return parts

    def _read_marker(self, key: str) -> dict | None:
        if not self.store.exists(key):
            return None
        try:
            return self.store.read_json(key)
        except LopdError:
            return None

    def read_part(self, part: Part):
        """The pyarrow Table of a finished part, read from a copy verified against the part's
        digest and size (:meth:`lopd.store.Store.open_verified`)."""
        import pyarrow.parquet as pq

        with self.store.open_verified(f"{self.shard}/{part.file.path}", part.file.digest, part.file.bytes) as f:
            return pq.read_table(f)

    # -- publish

    def publish(self, parts: list[Part], inputs: dict[str, InputRef], lineage: dict[str, Any],
                metrics: dict[str, Any] | None = None) -> Manifest | None:
        """Write this shard's manifest (listing the part files; metrics = summed part metrics plus
        ``metrics``, ``parts`` and ``rows``), then the stage manifest if every shard is done.
        Returns the stage manifest or None when other shards are still missing. A stage whose
        parts hold no rows at all raises :class:`lopd.parts.EmptyOutputError` (a one-shard stage
        before its shard manifest; otherwise the last shard, before the stage manifest)."""
        from lopd.manifest import merge_metrics

        total = merge_metrics([p.metrics for p in parts] + [metrics or {}])
        total["parts"] = len(parts)
        rows = total_rows(parts)
        if rows is not None:
            total["rows"] = rows
        if self.num_shards == 1:
            require_rows(self.stage, rows, total, self.store.url(self.prefix))
        m = Manifest(stage=self.stage, run_id=self.recipe.run_id, created_at=now(),
                     recipe_sha256=self.recipe.sha256(), inputs=inputs, files=[p.file for p in parts],
                     lineage=lineage, metrics=total, shard=ShardInfo(index=self.shard_index, count=self.num_shards))
        self.store.write_bytes(manifest_key(self.shard), manifest_bytes(m))
        log("shard_published", stage=self.stage, shard=self.shard, **{k: v for k, v in total.items()
                                                                      if isinstance(v, int | float)})
        return self.finalize()

    def finalize(self) -> Manifest | None:
        """Write the stage manifest when every shard manifest exists, unless they hold no rows."""
        out = finalize_shards(self.store, self.prefix, self.num_shards,
                              check=lambda m: require_rows(self.stage, m.metrics.get("rows"), m.metrics,
                                                           self.store.url(self.prefix)))
        if out is not None:
            log("stage_published", stage=self.stage, uri=self.store.url(self.prefix))
        return out


# --------------------------------------------------------------------------- start / entrypoint


def parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"jobs {stage}", description=f"lopd stage {stage}")
    p.add_argument("--recipe", "-r", required=True, help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable)")
    p.add_argument("--shard-index", type=int, default=None, help="default: $JOB_COMPLETION_INDEX, else 0")
    p.add_argument("--num-shards", type=int, default=None, help="default: the recipe section's shards")
    p.add_argument("--force", action="store_true", help="re-run even if the output manifest exists")
    p.add_argument("--round", type=int, default=1,
                   help="Lightning round (opd.rounds > 1): run the instance <stage>-r<ROUND> (default 1)")
    return p


def start(stage: str, argv: Sequence[str] | None = None) -> StageContext | None:
    """The harness's first step for every stage, inference and training alike: parse arguments,
    load the recipe, take the stage's section and shard from the registry; None when the stage
    (or this shard) is already published and ``--force`` was not given (the caller then returns).

    ``--force`` means the same for every stage: the stage manifest and everything this process
    would resume from are removed first (an inference shard's parts; a training stage's whole
    output, checkpoints included, since its ranks are one shard), by rank 0 only.
    """
    spec = get_stage(stage)
    args = parser(stage).parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    sec = spec.of(recipe)
    if sec is None:
        raise StageError(f"recipe has no '{spec.section}' section: stage {stage} cannot run")
    n_rounds = rounds_of(recipe) if spec.rounded else 1
    if not 1 <= args.round <= n_rounds:
        raise StageError(f"--round {args.round}: {stage} runs in round 1" + (
            f"..{n_rounds} (opd.rounds)" if spec.rounded else " only (it is not repeated per Lightning round)"))
    stage = instance(stage, args.round)
    default = spec.shards(recipe)
    num = args.num_shards if args.num_shards is not None else default
    idx = args.shard_index
    if idx is None:
        env = "" if spec.training else os.environ.get("JOB_COMPLETION_INDEX", "")
        if env and not env.isdigit():
            raise StageError(f"JOB_COMPLETION_INDEX={env!r} is not a shard index")
        idx = int(env) if env else 0
    if spec.training and (num, idx) != (1, 0):
        raise StageError(f"--shard-index/--num-shards: {stage} is a training stage, one shard whose ranks are "
                         f"a torchrun group (got shard {idx} of {num})")
    if num < 1 or not 0 <= idx < num:
        raise StageError(f"--shard-index {idx} out of range for --num-shards {num} (0..{num - 1})")
    store = open_store(recipe.store)
    workdir = Path(tempfile.mkdtemp(prefix=f"lopd-{stage}-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    ctx = StageContext(stage, recipe, sec, store, idx, num, args.force, workdir, args.round, n_rounds)
    store.check_within(ctx.prefix)
    own = ctx.prefix if spec.training else ctx.shard  # what this process resumes from
    if args.force:
        if int(os.environ.get("RANK", "0")) == 0:
            store.delete(manifest_key(ctx.prefix))
            store.delete(own)
            log("forced", stage=stage, removed=store.url(own))
    elif has_manifest(store, ctx.prefix):
        log("skip", stage=stage, reason="already published (use --force to redo)", uri=store.url(ctx.prefix))
        return None
    elif not spec.training and has_manifest(store, ctx.shard):
        log("skip", stage=stage, reason="shard already published", uri=store.url(ctx.shard))
        ctx.finalize()
        return None
    start_stage_log(store, ctx.prefix, idx, num, spec.training)  # LOPD_LOG_TO_STORE=1: the log beside the outputs
    log("start", stage=stage, run_id=recipe.run_id, shard=ctx.shard, store=store.url())
    return ctx


undumpable_if_asked()  # on import too: processes a stage spawns import its main module


def entrypoint(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`LopdError` becomes ``error: <message>`` on stderr and exit 2
    (``LOPD_DEBUG=1`` shows the traceback instead). Either way a failure's one line also goes to
    the termination log (:func:`termination_log`), which ``lopd status`` shows."""
    undumpable_if_asked()
    try:
        main(argv)
    except LopdError as e:
        termination_log(f"error: {e}")
        if os.environ.get("LOPD_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:
        termination_log(f"{type(e).__name__}: {e}")
        raise


__all__ = [
    "EmptyOutputError", "Lazy", "Part", "StageContext", "StageError", "entrypoint", "keys_sha256", "log", "parser",
    "prompt_seed", "start",
]

"""The local runner: ``lopd run`` and ``lopd pipeline`` (local backend), every stage as a
subprocess on this machine, exactly as its container runs it.

    bootstrap (embedded default only: task data, student base, trained teacher)
    for stage in the registry's order (lopd.stages; those the recipe has):
        skip it if its manifest exists
        run each shard (inference stages) or the torchrun group (training stages)
        check that its manifest now exists
    print the eval table and the path of the report's chart

Each stage's output goes to ``<store>/runs/<run>/logs/<stage>.log`` and each process's wall time
to ``logs/timings.jsonl``; the terminal shows one progress line per stage (rich), and the tail of
the log when a stage fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lopd import LopdError
from lopd.layout import local_run_dir, report_prefix, run_logs_dir, stage_prefix
from lopd.manifest import has_manifest, read_manifest, read_verified, read_verified_json
from lopd.recipe import Recipe, load_recipe
from lopd.stages import get as get_stage
from lopd.stages import split, stages_of
from lopd.store import open_store

TIMINGS = "timings.jsonl"
"""``<run dir>/logs/timings.jsonl``: one line per stage process the local runner ran (stage
instance, label, wall seconds including interpreter and engine start-up, exit code)."""


class PipelineError(LopdError):
    pass


def _env() -> dict[str, str]:
    """This environment with lopd's checkout first on PYTHONPATH (``jobs`` is found from any cwd)."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def stage_command(stage: str, recipe: str, overrides: tuple[str, ...], extra: list[str],
                  nproc: int = 1) -> list[str]:
    """The local command line for one stage instance: ``python -m jobs.<module>`` (``--round r``
    for a Lightning round's instance ``<stage>-r<r>``), or torchrun for a training stage with
    ``nproc > 1`` ranks."""
    spec, round = get_stage(stage), split(stage)[1]
    args = ["--recipe", recipe, *[a for o in overrides for a in ("--set", o)], *extra,
            *(["--round", str(round)] if round > 1 else [])]
    if spec.training and nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "-m", spec.entrypoint, *args]
    return [sys.executable, "-m", spec.entrypoint, *args]


def run_stage_process(stage: str, recipe: str, overrides: tuple[str, ...], extra: list[str], nproc: int = 1) -> int:
    """``lopd run``: one stage process in the foreground (output to this terminal); its exit code."""
    return subprocess.call(stage_command(stage, recipe, overrides, extra, nproc), env=_env())


def run_job(stage: str, recipe_file: Path, overrides: tuple[str, ...], log_path: Path, extra: list[str],
            nproc: int, label: str, console) -> None:
    """Run one stage process (or torchrun group), its output appended to ``log_path``."""
    cmd = stage_command(stage, str(recipe_file), overrides, extra, nproc)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log, console.status(f"[bold]{label}[/] running…") as status:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        while proc.poll() is None:
            status.update(f"[bold]{label}[/] running… {time.monotonic() - t0:.0f}s")
            time.sleep(0.5)
    with open(log_path.parent / TIMINGS, "a") as f:  # what each stage process cost (lopd repro's cost columns)
        f.write(json.dumps({"stage": stage, "label": label, "seconds": round(time.monotonic() - t0, 3),
                            "returncode": proc.returncode}) + "\n")
    if proc.returncode:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        console.print("\n".join(tail), markup=False, highlight=False)
        raise PipelineError(f"{label} failed with exit code {proc.returncode} (full log: {log_path})")
    console.print(f"[green]✓[/] {label} ({time.monotonic() - t0:.0f}s)")


def logs_dir(recipe: Recipe) -> Path:
    """``<local run dir>/logs``: where the runner writes each stage's output."""
    return run_logs_dir(local_run_dir(recipe.store, recipe.run_id))


def run_stages(recipe: Recipe, recipe_file: str | Path, stages: list[str], overrides: tuple[str, ...] = (),
               nproc: int = 1, console=None) -> None:
    """Run ``stages`` of one recipe in order, skipping each whose manifest already exists."""
    store = open_store(recipe.store)
    logs = logs_dir(recipe)
    for stage in stages:
        prefix = stage_prefix(recipe.run_id, stage)
        if has_manifest(store, prefix):
            console.print(f"[dim]• {recipe.run_id} {stage}: already published, skipped[/]")
            continue
        spec = get_stage(stage)
        shards = spec.shards(recipe)
        for i in range(shards):
            label = f"{recipe.run_id} {stage}" + ("" if shards == 1 else f" shard {i + 1}/{shards}")
            extra = [] if spec.training else ["--shard-index", str(i), "--num-shards", str(shards)]
            run_job(stage, Path(recipe_file), overrides, logs / f"{stage}.log", extra,
                    nproc if spec.training else 1, label, console)
        if not has_manifest(store, prefix):
            raise PipelineError(f"{stage} exited 0 but published no manifest at {store.url(prefix)}")


def run_bootstrap(recipe: Recipe, nproc: int = 1, console=None) -> None:
    """The embedded default's bootstrap (no-op without a ``bootstrap`` section)."""
    from lopd.bootstrap import bootstrap, teacher_run_id

    def run_stage(stage: str, recipe_file: Path) -> None:
        label = f"bootstrap: {teacher_run_id(recipe)} {stage}"
        run_job(stage, recipe_file, (), logs_dir(recipe) / f"bootstrap-{stage}.log", [],
                nproc if get_stage(stage).training else 1, label, console)

    bootstrap(recipe, run_stage, console.print)


def run_local(recipe_path: str, overrides: tuple[str, ...] = (), nproc: int = 1, console=None) -> dict | None:
    """Run the pipeline; returns the eval summary (or None when the recipe has no eval)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    recipe = load_recipe(recipe_path, overrides)
    t_start = time.monotonic()
    run_bootstrap(recipe, nproc, console)
    run_stages(recipe, recipe_path, stages_of(recipe), overrides, nproc, console)
    console.print(f"pipeline done in {time.monotonic() - t_start:.0f}s")
    return print_eval(recipe, console) if "eval" in stages_of(recipe) else None


def print_eval(recipe: Recipe, console) -> dict | None:
    """Print the eval report's table and where its chart is (its files read verified against the
    report's manifest)."""
    store = open_store(recipe.store)
    prefix = report_prefix(stage_prefix(recipe.run_id, "eval"))
    if not has_manifest(store, prefix):
        console.print(f"(no eval report at {store.url(prefix)})")
        return None
    m, _ = read_manifest(store, prefix)  # both files verified against the report's manifest
    summary = read_verified_json(store, prefix, "summary.json", m)
    table = read_verified(store, prefix, "report.md", m).decode(errors="replace")
    print(table, file=sys.stdout)
    console.print(f"report: {store.url(prefix)}/report.md, chart: {store.url(prefix)}/accuracy.png")
    return json.loads(json.dumps(summary))

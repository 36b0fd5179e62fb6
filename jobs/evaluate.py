"""Stage ``eval``: avg@k of one or more checkpoints on math and code benchmarks (shard i of n).

    parse → resolve the checkpoints (each must carry a MANIFEST.json) and the benchmarks
    (registry or eval.datasets) → this shard's (benchmark, problem) units → for each
    checkpoint, part by part: render prompts with the chat template, sample k responses,
    grade them (math-verify; code in the sandbox, in parallel) → publish the parts, the
    shard manifest and, when every shard is done, the stage manifest → the report
    (summary.json, report.md, accuracy.png) under ``<stage>/report/``.

Rows follow ``lopd.data.schemas.EVAL`` plus ``checkpoint``, ``finish_reason`` and
``verdict``. A killed shard resumes from its last complete part (see :mod:`lopd.stage`).

    python -m jobs.evaluate --recipe jobs/recipes/tiny.yaml [--shard-index I --num-shards N] [--force]
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from lopd import stage
from lopd.data.chat import encode_prompt
from lopd.data.schemas import EVAL
from lopd.eval.benchmarks import BenchmarkError, Problem, load_benchmark
from lopd.eval.code_grader import CodeJob, grade_code_batch
from lopd.eval.math_grader import grade_math, parse_gold
from lopd.eval.report import REPORT_STAGE_DIR, report_from_store
from lopd.eval.sandbox import SandboxLimits
from lopd.inference import load_backend
from lopd.lineage import HUB_ID_RE, MANIFEST, InputRef, has_manifest, stage_prefix
from lopd.store import is_store_uri, open_store

STAGE = "eval"
EVAL_RECORD = pa.schema([*EVAL, pa.field("checkpoint", pa.string()), pa.field("finish_reason", pa.string()),
                         pa.field("verdict", pa.string())])


# --------------------------------------------------------------------------- inputs


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
        for st in ("sft", "opd"):
            for sub in ("", "/final"):
                uri = f"{root.rstrip('/')}/{stage_prefix(recipe.run_id, st)}{sub}"
                if _has_manifest(uri):
                    out.append((st, uri))
                    break
        if not out:
            raise stage.StageError("eval.checkpoints is empty and this run has no published sft or opd checkpoint")
        return out
    out, seen = [], set()
    for i, entry in enumerate(cfg.checkpoints):
        label, ref = entry.split("=", 1) if "=" in entry.split("://")[0] else (None, entry)
        is_hub = HUB_ID_RE.match(ref) and not is_store_uri(ref) and not Path(ref).exists()
        if not is_hub and not _has_manifest(ref):
            raise stage.StageError(f"eval.checkpoints[{i}]: {ref!r} has no {MANIFEST} (not a published checkpoint)")
        label = label or Path(ref.rstrip("/")).name or f"ckpt{i}"
        base, n = label, 2
        while label in seen:
            label, n = f"{base}-{n}", n + 1
        seen.add(label)
        out.append((label, ref))
    return out


def load_problems(cfg) -> tuple[list[Problem], dict[str, str]]:
    """Every benchmark's problems (validated up front: a bad name or row fails before any engine)."""
    problems, kinds = [], {}
    for i, name in enumerate(cfg.benchmarks):
        try:
            probs = load_benchmark(name, cfg.datasets)
        except BenchmarkError as e:
            raise BenchmarkError(f"eval.benchmarks[{i}]: {e}") from None
        kinds[name] = probs[0].kind
        for p in probs:
            if p.kind == "math":
                try:
                    parse_gold(p.answer)
                except Exception as e:
                    raise BenchmarkError(f"benchmark {name}: problem {p.problem_id}: {e}") from None
        problems += probs
    return problems, kinds


# --------------------------------------------------------------------------- run


def grade(problems: list[Problem], responses: list[list[str]], cfg) -> list[list[tuple[bool, str | None, str]]]:
    """(correct, extracted, verdict) per sample: math in-process, code in parallel sandboxes."""
    out: list[list] = [[None] * len(r) for r in responses]
    limits = SandboxLimits(wall_s=cfg.code_timeout_s, cpu_s=max(1, int(round(cfg.code_timeout_s))),
                           memory_mb=cfg.code_memory_mb)
    jobs, where = [], []
    for i, (p, rs) in enumerate(zip(problems, responses, strict=True)):
        for j, r in enumerate(rs):
            if p.kind == "math":
                v = grade_math(r, p.answer)
                out[i][j] = (v.correct, v.extracted, v.verdict)
            else:
                jobs.append(CodeJob(r, p.tests, p.func_name, limits))
                where.append((i, j))
    workers = cfg.grader_workers or len(os.sched_getaffinity(0)) or 1
    for (i, j), v in zip(where, grade_code_batch(jobs, workers=min(workers, max(1, len(jobs)))), strict=True):
        out[i][j] = (v.correct, v.extracted, v.verdict)
    return out


def eval_part(part: list[Problem], label: str, engine: stage.Lazy, cfg) -> tuple[pa.Table, dict]:
    """k samples for each problem of the part, graded: one row per sample."""
    sp = cfg.sampling.model_copy(update={"n": cfg.k})
    backend = engine.get()
    prompts = [encode_prompt(backend.tokenizer, p.messages, sp.enable_thinking) for p in part]
    seeds = [stage.prompt_seed(sp.seed, f"{p.benchmark}/{p.problem_id}") for p in part]
    comps = backend.generate(prompts, sp, seeds=seeds)
    verdicts = grade(part, [[c.text for c in cs] for cs in comps], cfg)
    rows: dict[str, list] = {k: [] for k in EVAL_RECORD.names}
    metrics = {"samples": 0, "correct": 0, "response_tokens": 0, "truncated": 0}
    for p, cs, vs in zip(part, comps, verdicts, strict=True):
        for j, (c, (ok, extracted, verdict)) in enumerate(zip(cs, vs, strict=True)):
            if not c.token_ids and c.finish_reason == "length":
                verdict = "prompt_too_long"  # the backend had no room left in the context to answer
            for key, val in (("benchmark", p.benchmark), ("problem_id", p.problem_id), ("sample_index", j),
                             ("response", c.text), ("extracted", extracted), ("correct", ok),
                             ("num_tokens", len(c.token_ids)), ("checkpoint", label),
                             ("finish_reason", c.finish_reason), ("verdict", verdict)):
                rows[key].append(val)
            metrics["samples"] += 1
            metrics["correct"] += bool(ok)
            metrics["response_tokens"] += len(c.token_ids)
            metrics["truncated"] += c.finish_reason == "length"
    return pa.table(rows, schema=EVAL_RECORD), metrics


def main(argv: Sequence[str] | None = None) -> None:
    ctx = stage.start(STAGE, argv, section=lambda r: r.eval)
    if ctx is None:
        return
    cfg, recipe = ctx.section, ctx.recipe
    # resolve inputs: checkpoints (manifest required) and benchmarks, all checked before any engine starts
    refs = checkpoint_refs(recipe)
    problems, kinds = load_problems(cfg)
    mine = ctx.shard_items(problems)
    models = [(label, ctx.resolve_model(ref, f"eval.checkpoints ({label})")) for label, ref in refs]
    ctx.store.delete(f"{ctx.prefix}/{REPORT_STAGE_DIR}")  # a new evaluation outdates any old report
    stage.log("eval_plan", checkpoints=[lb for lb, _ in refs], benchmarks=list(kinds), problems=len(problems),
              shard_problems=len(mine), k=cfg.k)
    # run: per checkpoint, part by part (an engine starts only if one of its parts is left to do)
    parts = []
    for label, model in models:
        engine = stage.Lazy(lambda m=model: load_backend(m.path, cfg.inference, "auto", seed=cfg.sampling.seed))
        try:
            parts += ctx.run_parts(mine, cfg.part_size,
                                   lambda part, _i, lb=label, eng=engine: eval_part(part, lb, eng, cfg),
                                   key=lambda p: f"{p.benchmark}/{p.problem_id}", schema=EVAL_RECORD,
                                   name=re.sub(r"[^A-Za-z0-9_.-]", "_", label))
        finally:
            engine.close()
    # publish: shard manifest, stage manifest when all shards are in, then the report
    lineage = {"run_id": recipe.run_id, "k": cfg.k, "kinds": kinds, "sampling": cfg.sampling.model_dump(),
               "checkpoint_uris": {lb: ref for lb, ref in refs},
               "checkpoint_fingerprints": {lb: m.fingerprint for lb, m in models}}
    done = ctx.publish(parts, inputs={f"checkpoint:{lb}": m.input_ref() for lb, m in models}
                       | {f"benchmark:{b}": InputRef(uri=_benchmark_uri(b, cfg)) for b in kinds},
                       lineage=lineage)
    if done is not None:
        summary, local = report_from_store(ctx.store, ctx.prefix, run_id=recipe.run_id)
        stage.log("report_published", uri=ctx.store.url(f"{ctx.prefix}/{REPORT_STAGE_DIR}"),
                  **{f"{c}/{b}": round(m["avg"], 4) for c, r in summary["results"].items()
                     for b, m in r["benchmarks"].items()})


def _benchmark_uri(name: str, cfg) -> str:
    from lopd.eval.benchmarks import REGISTRY

    if name in cfg.datasets:
        return cfg.datasets[name].path
    return f"hf://datasets/{REGISTRY[name].hub_id}"


if __name__ == "__main__":
    stage.entrypoint(main)

"""Stage ``eval``: avg@k of one or more checkpoints on math and code benchmarks (shard i of n).

    parse → resolve the checkpoints (each must carry a MANIFEST.json) and the benchmarks
    (registry or eval.datasets) → this shard's (benchmark, problem) units → for each
    checkpoint, part by part: render prompts with the chat template, sample k responses,
    grade them (math-verify; code in the sandbox, in parallel) → publish the parts, the
    shard manifest and, when every shard is done, the stage manifest → the report
    (summary.json, report.md, accuracy.png) under ``<stage>/report/``.

Rows follow ``lopd.data.schemas.EVAL_RECORD`` (``EVAL`` plus ``checkpoint``, ``finish_reason`` and
``verdict``). A killed shard resumes from its last complete part (see :mod:`lopd.stage`). The
steps live in :mod:`lopd.eval` (``checkpoints``, ``problems``, ``sampling``, ``grading``, ``report``).

    python -m jobs.evaluate --recipe jobs/recipes/tiny.yaml [--shard-index I --num-shards N] [--force]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lopd import stage
from lopd.data.schemas import EVAL_RECORD
from lopd.eval.checkpoints import checkpoint_refs
from lopd.eval.grading import grading_rules
from lopd.eval.problems import benchmark_uri, load_problems
from lopd.eval.report import report_from_store
from lopd.eval.sampling import eval_part
from lopd.inference import load_backend
from lopd.layout import report_prefix
from lopd.manifest import InputRef

STAGE = "eval"


def main(argv: Sequence[str] | None = None) -> None:
    ctx = stage.start(STAGE, argv)
    if ctx is None:
        return
    cfg, recipe = ctx.section, ctx.recipe
    # resolve inputs: checkpoints (manifest required) and benchmarks, all checked before any engine starts
    refs = checkpoint_refs(recipe)
    problems, kinds = load_problems(cfg)
    mine = ctx.shard_items(problems)
    models = [(label, ctx.resolve_model(ref, f"eval.checkpoints ({label})")) for label, ref in refs]
    ctx.store.delete(report_prefix(ctx.prefix))  # a new evaluation outdates any old report
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
               "checkpoint_fingerprints": {lb: m.fingerprint for lb, m in models}, "grading": grading_rules(cfg)}
    done = ctx.publish(parts, inputs={f"checkpoint:{lb}": m.input_ref() for lb, m in models}
                       | {f"benchmark:{b}": InputRef(uri=benchmark_uri(b, cfg)) for b in kinds},
                       lineage=lineage)
    if done is not None:
        summary, _local = report_from_store(ctx.store, ctx.prefix, run_id=recipe.run_id)
        stage.log("report_published", uri=ctx.store.url(report_prefix(ctx.prefix)),
                  **{f"{c}/{b}": round(m["avg"], 4) for c, r in summary["results"].items()
                     for b, m in r["benchmarks"].items()})


if __name__ == "__main__":
    stage.entrypoint(main)

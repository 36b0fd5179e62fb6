"""One part of an ``eval`` shard: k samples of each problem from one checkpoint, graded.

Rows follow :data:`lopd.data.schemas.EVAL_RECORD` (the ``EVAL`` contract plus ``checkpoint``,
``finish_reason`` and ``verdict``), one per sample. Each problem is sampled with its own seed
(from ``eval.sampling.seed`` and ``benchmark/problem_id``), so its samples do not depend on the
shard, part or batch it lands in.
"""

from __future__ import annotations

import pyarrow as pa

from lopd.data.chat import encode_prompt
from lopd.data.schemas import EVAL_RECORD
from lopd.eval.benchmarks import Problem
from lopd.eval.grading import grade
from lopd.stage import Lazy, prompt_seed


def eval_part(part: list[Problem], label: str, engine: Lazy, cfg) -> tuple[pa.Table, dict]:
    """k samples for each problem of the part, graded: one row per sample, and the part's counts."""
    sp = cfg.sampling.model_copy(update={"n": cfg.k})
    backend = engine.get()
    prompts = [encode_prompt(backend.tokenizer, p.messages, sp.enable_thinking) for p in part]
    seeds = [prompt_seed(sp.seed, f"{p.benchmark}/{p.problem_id}") for p in part]
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

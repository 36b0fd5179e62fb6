"""Stage ``precompute``: SFT-student rollouts, then the teacher's log-prob of every rollout token.

    parse → resolve the SFT checkpoint and the teacher → teacher-consistency check against the
    checkpoint's lineage (BEFORE any work) → same-vocabulary check → for this shard's prompts:
      phase 1: the SFT student samples rollouts, part by part (token ids + its own log-probs);
      phase 2: the teacher scores every response token of each rollout part (and, with
               ``teacher_topk: k``, stores its k most likely tokens at every position);
    → publish the scored parts (schema ``precompute_schema(teacher_topk)``), shard and stage manifests.

The consistency record (``lopd.lineage.check_teacher_consistency``) goes into the lineage, so
``allow_inconsistent_teacher`` is visible in every downstream manifest. Prompts longer than
the context are skipped and counted (``skipped_too_long``); rollouts cut at ``max_tokens`` are
kept, marked ``finish_reason: length`` and counted (``truncated``). ``rollout_logprobs`` are the
student's raw (temperature-1) log-probs whatever the sampling parameters; the lineage records that
(``rollout_logprobs: raw``) and the sampling parameters, which opd checks before it uses them for
importance weights or the KL guard, and ``teacher_topk`` (0: no top-k columns). Both phases
resume from their last complete part after a kill; phase-1 parts are intermediates (``rollouts-NNNNN.parquet``)
that the manifest does not list.

With ``opd.rounds: R`` > 1 this entrypoint also runs Lightning round r's instance
(``--round r``, stage ``precompute-r<r>``): part r of the prompts, sampled by round r-1's OPD
output, scored by the same teacher (:mod:`lopd.rounds`).

    python -m jobs.precompute --recipe jobs/recipes/tiny.yaml [--shard-index I --num-shards N] [--round R] [--force]
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from lopd import LopdError, stage
from lopd.data.chat import check_same_vocab
from lopd.data.prompts import Prompt, load_prompts
from lopd.data.schemas import PRECOMPUTE, precompute_schema
from lopd.inference import context_length, load_backend, sample_chats
from lopd.layout import stage_prefix
from lopd.lineage import check_teacher_consistency
from lopd.manifest import InputRef
from lopd.rounds import check_round_teacher, round_items
from lopd.stages import instance

STAGE = "precompute"
ROLLOUTS = pa.schema([f for f in PRECOMPUTE if f.name != "teacher_logprobs"])
SAMPLING_KEYS = {"temperature", "top_p", "n", "max_tokens", "seed"}  # recorded in the lineage


def rollout_part(part: list[Prompt], tokenizer, student: stage.Lazy, cfg, ctx_len: int) -> tuple[pa.Table, dict]:
    """Phase 1 for one part: ``sampling.n`` student rollouts per prompt, token ids kept as sampled;
    ``sample_s`` is the wall time of the sampling (the engine's start included when it happens here)."""
    t0 = time.perf_counter()
    kept, skipped = sample_chats(student.get, tokenizer, part, cfg.sampling, ctx_len)
    rows: dict[str, list] = {k: [] for k in ROLLOUTS.names}
    metrics = {"prompts": len(part), "skipped_too_long": skipped, "rollouts": 0, "response_tokens": 0,
               "finished_stop": 0, "truncated": 0, "sample_s": round(time.perf_counter() - t0, 3)}
    for p, ids, comps in kept:
        for k, c in enumerate(comps):
            for name, v in (("prompt_id", p.prompt_id), ("sample_index", k), ("prompt_token_ids", ids),
                            ("response_token_ids", c.token_ids), ("rollout_logprobs", c.logprobs),
                            ("finish_reason", c.finish_reason), ("answer", p.answer)):
                rows[name].append(v)
            metrics["rollouts"] += 1
            metrics["response_tokens"] += len(c.token_ids)
            metrics["finished_stop"] += c.finish_reason == "stop"
            metrics["truncated"] += c.finish_reason == "length"
    return pa.table(rows, schema=ROLLOUTS), metrics


def score_part(rollouts: pa.Table, teacher: stage.Lazy, where: str, topk: int = 0) -> tuple[pa.Table, dict]:
    """Phase 2 for one part: teacher log p(y_t | x, y_<t) for every response token (float32) and,
    with ``topk > 0``, the teacher's top-k ids and log-probs at every position, flattened ``[t, j]``;
    ``score_s`` is the wall time of the scoring (the engine's start included when it happens here)."""
    t0 = time.perf_counter()
    prompts = rollouts.column("prompt_token_ids").to_pylist()
    responses = rollouts.column("response_token_ids").to_pylist()
    scores, lps = [], []
    if responses and topk:
        scores = teacher.get().score_topk(prompts, responses, topk)
        lps = [s.logprobs for s in scores]
    elif responses:
        lps = teacher.get().score(prompts, responses)
    score_s = round(time.perf_counter() - t0, 3)
    for row, (r, s) in enumerate(zip(responses, lps, strict=True)):
        if len(s) != len(r) or not np.all(np.isfinite(s)):
            raise LopdError(f"{where}: row {row}: teacher returned {len(s)} finite log-probs for {len(r)} tokens")
    schema = precompute_schema(topk)
    cols = {"teacher_logprobs": [np.asarray(s, np.float32) for s in lps]}
    for row, s in enumerate(scores):
        if s.topk_ids.shape != (len(responses[row]), topk) or not np.all(np.isfinite(s.topk_logprobs)):
            raise LopdError(f"{where}: row {row}: teacher returned a top-k of shape {s.topk_ids.shape}, expected "
                            f"({len(responses[row])}, {topk}) finite")
    if topk:
        lp_type = schema.field("teacher_topk_logprobs").type.value_type.to_pandas_dtype()
        cols["teacher_topk_ids"] = [np.asarray(s.topk_ids, np.int32).reshape(-1) for s in scores]
        cols["teacher_topk_logprobs"] = [np.asarray(s.topk_logprobs).astype(lp_type).reshape(-1) for s in scores]
    for name, values in cols.items():
        rollouts = rollouts.append_column(name, pa.array(values, type=schema.field(name).type))
    return rollouts.select(schema.names), {"scored_tokens": int(sum(len(r) for r in responses)), "score_s": score_s}


def main(argv: Sequence[str] | None = None) -> None:
    ctx = stage.start(STAGE, argv)
    if ctx is None:
        return
    cfg, recipe = ctx.section, ctx.recipe
    # resolve inputs; the consistency and vocabulary checks come before any work. Round 1 samples
    # with the SFT student; Lightning round r >= 2 with round r-1's OPD output (lopd.rounds)
    if ctx.round == 1:
        student_ref = cfg.student or ctx.store.url(stage_prefix(recipe.run_id, "sft"))
    else:
        student_ref = ctx.store.url(stage_prefix(recipe.run_id, instance("opd", ctx.round - 1)))
    student = ctx.resolve_model(student_ref, "precompute.student")
    teacher = ctx.resolve_model(recipe.models.teacher, "models.teacher.uri")
    if ctx.round == 1:
        consistency = check_teacher_consistency(student.lineage.get("teacher_fingerprint"), teacher.fingerprint,
                                                recipe.allow_inconsistent_teacher)
    else:
        consistency = check_round_teacher(student.lineage, teacher.fingerprint, student_ref)
    from transformers import AutoTokenizer

    s_tok = AutoTokenizer.from_pretrained(str(student.path))
    check_same_vocab(AutoTokenizer.from_pretrained(str(teacher.path)), s_tok, "teacher", "SFT student")
    prompts = ctx.shard_items(round_items(load_prompts(cfg.prompts), ctx.round, ctx.rounds))
    scoring = cfg.scoring or cfg.inference
    ctx_len = min(context_length(student.path, cfg.inference), context_length(teacher.path, scoring))
    # phase 1: the SFT student samples (engine started only if a part is left to do)
    engine = stage.Lazy(lambda: load_backend(student.path, cfg.inference, recipe.models.student.dtype,
                                             seed=cfg.sampling.seed))
    try:
        rollouts = ctx.run_parts(prompts, cfg.part_size, lambda part, _i: rollout_part(part, s_tok, engine, cfg,
                                                                                       ctx_len),
                                 key=lambda p: p.prompt_id, schema=ROLLOUTS, name="rollouts")
    finally:
        engine.close()
    # phase 2: the teacher scores every response token, part by part
    engine = stage.Lazy(lambda: load_backend(teacher.path, scoring, recipe.models.teacher.dtype))
    try:
        # one scored part per rollout part, keyed by the rollout file's digest (a redone rollout
        # part can never pair with stale scores)
        parts = ctx.run_parts(rollouts, 1, lambda rs, _i: score_part(ctx.read_part(rs[0]), engine,
                                                                     ctx.store.url(f"{ctx.shard}/{rs[0].file.path}"),
                                                                     cfg.teacher_topk),
                              key=lambda r: r.file.digest, schema=precompute_schema(cfg.teacher_topk))
    finally:
        engine.close()
    for r, p in zip(rollouts, parts, strict=True):
        p.metrics = {**r.metrics, **p.metrics}
    # publish
    ctx.publish(parts, inputs={"student": student.input_ref(), "teacher": teacher.input_ref(),
                               "prompts": InputRef(uri=cfg.prompts)},
                lineage={**consistency, "student_fingerprint": student.fingerprint,
                         "student": student_ref, "teacher": recipe.models.teacher.uri, "context_length": ctx_len,
                         "rollout_logprobs": "raw", "sampling": cfg.sampling.model_dump(include=SAMPLING_KEYS),
                         "teacher_topk": cfg.teacher_topk, "scoring_backend": scoring.backend,
                         "round": ctx.round, "rounds": ctx.rounds})
    for r in rollouts:  # the phase-1 intermediates are now inside the scored parts
        ctx.store.delete(f"{ctx.shard}/{r.file.path}")


if __name__ == "__main__":
    stage.entrypoint(main)

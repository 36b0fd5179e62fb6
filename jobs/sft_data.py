"""Stage ``sft-data``: the teacher answers the SFT prompts (shard i of n).

    parse → resolve the teacher (fingerprint) and the prompts → for each part of this shard:
    render prompts with the chat template, sample the teacher, keep its token ids' text as the
    assistant turn (with its ``finish_reason``: ``stop`` or ``length``) → publish parts, shard
    manifest (lineage: teacher fingerprint, ``enable_thinking`` and the teacher's chat rendering,
    which the sft stage checks the student against), stage manifest.

Prompts longer than the context are skipped and counted (``skipped_too_long``). A killed
shard resumes from its last complete part (see :mod:`lopd.stage`).

    python -m jobs.sft_data --recipe jobs/recipes/tiny.yaml [--shard-index I --num-shards N] [--force]
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyarrow as pa

from lopd import stage
from lopd.data.chat import chat_rendering
from lopd.data.prompts import Prompt, load_prompts
from lopd.data.schemas import SFT_DATA
from lopd.inference import context_length, load_backend, sample_chats
from lopd.manifest import InputRef

STAGE = "sft-data"


def answer_part(part: list[Prompt], tokenizer, backend: stage.Lazy, cfg, ctx_len: int) -> tuple[pa.Table, dict]:
    """Teacher answers for one part: one row per (prompt, sample); too-long prompts skipped.
    ``sample_s`` is the wall time of the sampling (the engine's start included when it happens here)."""
    t0 = time.perf_counter()
    kept, skipped = sample_chats(backend.get, tokenizer, part, cfg.sampling, ctx_len)
    rows: dict[str, list] = {k: [] for k in SFT_DATA.names}
    metrics = {"prompts": len(part), "skipped_too_long": skipped, "samples": 0, "response_tokens": 0,
               "finished_stop": 0, "sample_s": round(time.perf_counter() - t0, 3)}
    for p, _, comps in kept:
        for c in comps:
            rows["prompt_id"].append(p.prompt_id)
            rows["messages"].append([*p.messages, {"role": "assistant", "content": c.text}])
            rows["num_tokens"].append(len(c.token_ids))
            rows["finish_reason"].append(c.finish_reason)
            metrics["samples"] += 1
            metrics["response_tokens"] += len(c.token_ids)
            metrics["finished_stop"] += c.finish_reason == "stop"
    return pa.table(rows, schema=SFT_DATA), metrics


def main(argv: Sequence[str] | None = None) -> None:
    ctx = stage.start(STAGE, argv)
    if ctx is None:
        return
    cfg, models = ctx.section, ctx.recipe.models
    # resolve inputs
    teacher = ctx.resolve_model(models.teacher, "models.teacher.uri")
    prompts = ctx.shard_items(load_prompts(cfg.prompts))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher.path))
    ctx_len = context_length(teacher.path, cfg.inference)
    rendering = chat_rendering(tokenizer, cfg.sampling.enable_thinking)  # what sft checks the student against
    # run: the teacher answers, part by part (engine started only if a part is left to do)
    engine = stage.Lazy(lambda: load_backend(teacher.path, cfg.inference, models.teacher.dtype,
                                             seed=cfg.sampling.seed))
    try:
        parts = ctx.run_parts(prompts, cfg.part_size, lambda part, _i: answer_part(part, tokenizer, engine, cfg,
                                                                                   ctx_len),
                              key=lambda p: p.prompt_id, schema=SFT_DATA)
    finally:
        engine.close()
    # publish
    ctx.publish(parts, inputs={"teacher": teacher.input_ref(), "prompts": InputRef(uri=cfg.prompts)},
                lineage={"teacher_fingerprint": teacher.fingerprint, "teacher": models.teacher.uri,
                         "context_length": ctx_len, "enable_thinking": cfg.sampling.enable_thinking,
                         "chat_rendering": rendering})


if __name__ == "__main__":
    stage.entrypoint(main)

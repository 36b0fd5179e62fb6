"""Stage ``sft``: full fine-tuning of the student base on the teacher's SFT data, on DeepSpeed.

    parse → resolve inputs (the sft-data manifest and its teacher fingerprint, the student base;
    the student's chat template must render like the teacher's, as the sft-data lineage records)
    → build the engine (resuming from the latest checkpoint) → for each step: the global batch's
    conversations, packed without cross-sequence attention, loss on the teacher's answer only
    (answers cut by the length limit dropped or masked: ``sft.truncated``),
    cosine schedule with warm-up → publish the HF checkpoint with the teacher fingerprint in
    its lineage (what precompute's teacher-consistency check reads).

    python -m jobs.sft --recipe R [--force]
    python -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.sft --recipe R
"""

from __future__ import annotations

from collections.abc import Sequence

from lopd import stage
from lopd.data.chat import check_same_rendering
from lopd.layout import manifest_key, stage_prefix
from lopd.manifest import InputRef
from lopd.train.data import TrainDataError, global_batch_indices, rank_share
from lopd.train.sft import PLOT_KEYS, sft_step
from lopd.train.sft_rows import load_sft_seqs
from lopd.train.trainer import TrainRun

STAGE = "sft"


def main(argv: Sequence[str] | None = None) -> None:
    run = TrainRun.start(STAGE, argv)
    if run is None:
        return
    cfg, recipe = run.section, run.recipe
    student = stage.resolve_model(recipe.models.student, "models.student.uri")
    from transformers import AutoTokenizer

    prefix = (cfg.data or stage_prefix(recipe.run_id, "sft-data")).strip("/")
    tokenizer = AutoTokenizer.from_pretrained(student.path)
    seqs, m, sha, counts = load_sft_seqs(run.store, prefix, tokenizer, cfg.train.max_seq_len, cfg.truncated)
    teacher_fp = m.lineage.get("teacher_fingerprint")
    if not teacher_fp:
        raise TrainDataError(f"{run.store.url(manifest_key(prefix))}: lineage.teacher_fingerprint is missing")
    if m.lineage.get("chat_rendering"):
        check_same_rendering(m.lineage["chat_rendering"], tokenizer, "teacher (sft-data)", "student base")
    stage.log("data", stage=STAGE, conversations=len(seqs), uri=run.store.url(prefix), **counts)
    run.build(student)

    def batch(step: int):
        idx = global_batch_indices(len(seqs), step, cfg.train.global_batch, cfg.train.seed)
        return rank_share([seqs[i] for i in idx], run.rank, run.world)

    run.loop(lambda step, lr: sft_step(run.engine, batch(step), cfg, lr, run.world))
    run.publish({"student_base": student.input_ref(),
                 "sft_data": InputRef(uri=run.store.url(prefix), manifest_sha256=sha)},
                {"teacher_fingerprint": teacher_fp, "student_base_fingerprint": student.fingerprint},
                PLOT_KEYS, {"conversations": len(seqs), **counts})


if __name__ == "__main__":
    stage.entrypoint(main)

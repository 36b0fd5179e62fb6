"""Stage ``opd``: on-policy distillation of the SFT student towards the teacher, on DeepSpeed.

    parse → resolve inputs (offline: the precompute manifest, teacher-consistency record, the
    SFT checkpoint that sampled the rollouts; online: the SFT checkpoint, the prompts, a live
    teacher) → build the engine (resuming from the latest checkpoint) → for each step: take the
    global batch (offline: the next slice of the fixed rollouts; online: fresh rollouts of the
    current student scored by the teacher) → PPO-clipped policy-gradient step on
    A_t = log p_teacher − log p_old → publish the final HF checkpoint, metrics and curves.

    python -m jobs.opd --recipe R [--set opd.mode=online] [--force]
    python -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.opd --recipe R
"""

from __future__ import annotations

from collections.abc import Sequence

from lopd import stage
from lopd.lineage import InputRef, stage_prefix
from lopd.train.data import TrainDataError, global_batch_indices, load_opd_samples, open_precompute
from lopd.train.opd import PLOT_KEYS, opd_step, split_minis
from lopd.train.trainer import TrainRun

STAGE = "opd"


def offline_inputs(run: TrainRun):
    """The precompute data (validated) and the SFT checkpoint that sampled it."""
    recipe, cfg = run.recipe, run.section
    prefix = (cfg.rollouts or stage_prefix(recipe.run_id, "precompute")).strip("/")
    m, sha = open_precompute(run.store, prefix, recipe.allow_inconsistent_teacher)
    ref = cfg.student or m.lineage.get("student") or run.store.url(stage_prefix(recipe.run_id, "sft"))
    student = stage.resolve_model(ref, "opd.student")
    sampled_by = m.lineage.get("student_fingerprint")
    if sampled_by is not None and sampled_by != student.fingerprint:
        raise TrainDataError(f"opd.student: {ref} (fingerprint {student.fingerprint}) is not the model that "
                             f"sampled the precomputed rollouts ({sampled_by})")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(student.path).vocab_size
    samples, skipped = load_opd_samples(run.store, prefix, m, cfg.train.max_seq_len, vocab)
    stage.log("data", stage=STAGE, rows=len(samples), skipped_too_long=skipped, uri=run.store.url(prefix))
    inputs = {"student": student.input_ref(), "precompute": InputRef(uri=run.store.url(prefix), manifest_sha256=sha)}
    keep = ("teacher_fingerprint", "sft_teacher_fingerprint", "teacher_consistent", "allow_inconsistent_teacher")
    lineage = {**{k: m.lineage.get(k) for k in keep}, "student_fingerprint": student.fingerprint, "mode": "offline"}
    return student, samples, inputs, lineage, {"rows": len(samples), "skipped_too_long": skipped}


def main(argv: Sequence[str] | None = None) -> None:
    run = TrainRun.start(STAGE, argv, lambda r: r.opd)
    if run is None:
        return
    cfg = run.section
    diag = source = None
    if cfg.mode == "online":
        from lopd.train.online import OnlineSource

        source = OnlineSource.from_run(run)
        student, inputs, lineage, summary = source.student, source.inputs, source.lineage, {}
        run.build(student.path)
        source.attach(run)

        def batch(step: int):  # each rank samples its share; mini-batches split it locally
            return split_minis(source.batch(step), cfg.mini_batches, 0, 1)
    else:
        student, samples, inputs, lineage, summary = offline_inputs(run)
        run.build(student.path)

        def batch(step: int):
            idx = global_batch_indices(len(samples), step, cfg.train.global_batch, cfg.train.seed)
            return split_minis([samples[i] for i in idx], cfg.mini_batches, run.rank, run.world)

        if cfg.grad_discrepancy_every:
            from lopd.train.diagnostic import GradientDiagnostic

            diag = GradientDiagnostic(run, student)

    def step(i: int, lr: float) -> dict[str, float]:
        minis = batch(i)
        extra = diag.measure(i, [s for m in minis for s in m]) if diag and i % cfg.grad_discrepancy_every == 0 \
            else {}
        rec = opd_step(run.engine, minis, cfg, lr, run.world)
        return {**rec, **extra, **(source.timings if source else {})}

    run.loop(step)
    run.publish(inputs, lineage, PLOT_KEYS + (["grad_cosine", "grad_norm_ratio"] if diag else []), summary)
    for x in (source, diag):
        if x is not None:
            x.close()


if __name__ == "__main__":
    stage.entrypoint(main)

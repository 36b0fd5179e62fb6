"""Stage ``opd``: on-policy distillation of the SFT student towards the teacher, on DeepSpeed.

    parse → resolve the rollout source (offline: the precompute manifest, teacher-consistency
    record, the SFT checkpoint that sampled the rollouts; online: the SFT checkpoint, the prompts,
    a live teacher) → build the engine (resuming from the latest checkpoint) → for each step: take the
    global batch (offline: the next slice of the fixed rollouts; online: fresh rollouts of the
    current student scored by the teacher) → PPO-clipped policy-gradient step on
    A_t = log p_teacher − log p_old → publish the final HF checkpoint, metrics and curves.

    python -m jobs.opd --recipe R [--set opd.mode=online] [--force]
    python -m torch.distributed.run --standalone --nproc-per-node=2 -m jobs.opd --recipe R
"""

from __future__ import annotations

from collections.abc import Sequence

from lopd import stage
from lopd.train.opd import PLOT_KEYS, opd_step
from lopd.train.trainer import TrainRun

STAGE = "opd"


def rollout_source(run: TrainRun):
    """Offline (Lightning): the fixed rollouts precompute published; online: fresh rollouts of the
    current student, scored by a live teacher. Both resolve their inputs here, before any engine."""
    if run.section.mode == "online":
        from lopd.train.online import OnlineSource

        return OnlineSource.from_run(run)
    from lopd.train.offline import OfflineSource

    return OfflineSource.from_run(run)


def main(argv: Sequence[str] | None = None) -> None:
    run = TrainRun.start(STAGE, argv)
    if run is None:
        return
    source = rollout_source(run)
    run.build(source.student)  # resumes from the latest checkpoint
    source.attach(run)

    def step(i: int, lr: float) -> dict[str, float]:
        minis = source.minibatches(i)  # this rank's share of each PPO mini-batch
        before = source.before_step(i, minis)
        return {**opd_step(run.engine, minis, run.section, lr, run.world), **before}

    run.loop(step)
    run.publish(source.inputs, source.lineage, PLOT_KEYS + source.plot_keys, source.summary)
    source.close()


if __name__ == "__main__":
    stage.entrypoint(main)

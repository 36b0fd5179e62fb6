"""Lightning rounds (``opd.rounds: R``): the paper's offline OPD, repeated on fresh rollouts.

    split the OPD prompts into R contiguous, disjoint parts
    for r in 1..R:
        precompute-r<r>: the student as round r-1 left it (round 1: the SFT student) samples
                         part r; the same teacher scores every token
        opd-r<r>:        updates (r-1)·S/R .. r·S/R on those rollouts, continuing round r-1's
                         weights, Adam moments, step count and learning-rate schedule
    eval: the last round's student

Round 1's stages keep their names (``precompute``, ``opd``), so R = 1 is the paper's pipeline
unchanged. Sampled and scored tokens are exactly those of R = 1 (each prompt once, with the
per-prompt seed of :func:`lopd.parts.prompt_seed`); the extra cost is R-1 more start-ups of each
stage, and the teacher is never resident while the student trains.

Each round's manifests carry the chain: ``precompute-r<r>`` records the fingerprint of the
student that sampled it (round r-1's published OPD output) and the teacher's; ``opd-r<r>``
refuses rollouts not sampled by the checkpoint it starts from, and continues from the resumable
checkpoint round r-1 saved at its last step (``lineage.final_checkpoint``), made under the same
recipe. The teacher must be the same in every round (:func:`check_round_teacher`).
"""

from __future__ import annotations

from typing import TypeVar

from lopd.lineage import TeacherMismatchError

T = TypeVar("T")


def round_bounds(n: int, round: int, rounds: int) -> tuple[int, int]:
    """``[start, end)`` of round ``round`` (1-based) when ``n`` things are split into ``rounds``
    contiguous parts as evenly as integers allow (``floor(r·n/R)`` boundaries)."""
    if not 1 <= round <= rounds:
        raise ValueError(f"round {round} out of range 1..{rounds}")
    return (round - 1) * n // rounds, round * n // rounds


def round_items(items: list[T], round: int, rounds: int) -> list[T]:
    """Round ``round``'s contiguous part of ``items`` (the OPD prompts, in file order)."""
    start, end = round_bounds(len(items), round, rounds)
    return items[start:end]


def round_steps(steps: int, round: int, rounds: int) -> tuple[int, int]:
    """The optimizer steps ``[first, end)`` round ``round`` makes out of ``steps`` in all."""
    return round_bounds(steps, round, rounds)


def check_round_teacher(student_lineage: dict, teacher_fingerprint: str, where: str) -> dict:
    """Round r >= 2's consistency record: the teacher scoring this round is the one that scored
    round r-1 (the ``teacher_fingerprint`` in the lineage of round r-1's OPD output, the student
    that samples now); the SFT-data teacher and the ablation flag carry over from round 1.
    Raises :class:`TeacherMismatchError` naming both fingerprints."""
    before = student_lineage.get("teacher_fingerprint")
    if before != teacher_fingerprint:
        raise TeacherMismatchError(f"teacher consistency: {where} was trained on rollouts scored by teacher "
                                   f"{before or '(not recorded)'} but this round's teacher is {teacher_fingerprint}; "
                                   "every Lightning round uses the same teacher")
    return {"teacher_fingerprint": teacher_fingerprint,
            "sft_teacher_fingerprint": student_lineage.get("sft_teacher_fingerprint"),
            "teacher_consistent": bool(student_lineage.get("teacher_consistent")),
            "allow_inconsistent_teacher": bool(student_lineage.get("allow_inconsistent_teacher"))}


__all__ = ["check_round_teacher", "round_bounds", "round_items", "round_steps"]

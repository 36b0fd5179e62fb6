"""Lineage: which models and inputs an artifact came from, and the teacher-consistency check.

Every manifest (:mod:`lopd.manifest`) records its lineage: the fingerprints
(:mod:`lopd.fingerprint`) of the models involved and the inputs it was made from. The paper's
condition rests on it: the teacher scoring the student's rollouts must be the teacher whose
answers the student was fine-tuned on; :func:`check_teacher_consistency` enforces it.
"""

from __future__ import annotations

from lopd import LopdError


class TeacherMismatchError(LopdError):
    """The scoring teacher is not the teacher the SFT data came from."""


def check_teacher_consistency(sft_teacher: str | None, scoring_teacher: str, allow_inconsistent: bool) -> dict:
    """The paper's condition: the teacher scoring the rollouts is the one that wrote the SFT data.

    ``sft_teacher`` is the fingerprint in the SFT checkpoint's lineage; ``scoring_teacher`` the
    fingerprint of the teacher about to score. Returns the lineage record to carry downstream;
    raises :class:`TeacherMismatchError` naming both fingerprints unless ``allow_inconsistent``.
    """
    consistent = sft_teacher is not None and sft_teacher == scoring_teacher
    if not consistent and not allow_inconsistent:
        if sft_teacher is None:
            raise TeacherMismatchError(
                "teacher consistency: the SFT checkpoint records no teacher fingerprint; "
                f"cannot check scoring teacher {scoring_teacher} "
                "(set allow_inconsistent_teacher: true only for the ablation)"
            )
        raise TeacherMismatchError(
            f"teacher consistency: SFT data came from teacher {sft_teacher} but the scoring "
            f"teacher is {scoring_teacher}; use the same teacher "
            "(set allow_inconsistent_teacher: true only for the ablation)"
        )
    return {
        "teacher_fingerprint": scoring_teacher,
        "sft_teacher_fingerprint": sft_teacher,
        "teacher_consistent": consistent,
        "allow_inconsistent_teacher": bool(allow_inconsistent),
    }


__all__ = ["TeacherMismatchError", "check_teacher_consistency"]

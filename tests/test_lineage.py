"""Lineage (lopd.lineage): the teacher-consistency check, and its one-line error."""

from __future__ import annotations

import pytest

from lopd.lineage import TeacherMismatchError, check_teacher_consistency


def test_teacher_consistency():
    t, u = "1" * 64, "2" * 64
    rec = check_teacher_consistency(t, t, allow_inconsistent=False)
    assert rec["teacher_consistent"] and not rec["allow_inconsistent_teacher"]
    with pytest.raises(TeacherMismatchError) as e:
        check_teacher_consistency(t, u, allow_inconsistent=False)
    assert t in str(e.value) and u in str(e.value) and "\n" not in str(e.value)
    rec = check_teacher_consistency(t, u, allow_inconsistent=True)
    assert rec == {"teacher_fingerprint": u, "sft_teacher_fingerprint": t, "teacher_consistent": False,
                   "allow_inconsistent_teacher": True}
    with pytest.raises(TeacherMismatchError, match="records no teacher fingerprint"):
        check_teacher_consistency(None, u, allow_inconsistent=False)

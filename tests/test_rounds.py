"""Lightning rounds' pure parts (:mod:`lopd.rounds`): the split of prompts and steps into rounds,
and the teacher-consistency record of a later round."""

from __future__ import annotations

import pytest

from lopd.lineage import TeacherMismatchError
from lopd.rounds import check_round_teacher, round_bounds, round_items, round_steps


@pytest.mark.parametrize("n,rounds", [(10, 1), (10, 3), (4096, 4), (5, 5), (7, 2)])
def test_rounds_split_into_disjoint_contiguous_parts_covering_everything(n, rounds):
    parts = [round_items(list(range(n)), r, rounds) for r in range(1, rounds + 1)]
    assert [x for p in parts for x in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert round_steps(n, rounds, rounds)[1] == n and round_steps(n, 1, rounds)[0] == 0
    with pytest.raises(ValueError, match="round 0 out of range"):
        round_bounds(n, 0, rounds)


def test_rounds_teacher_must_be_the_previous_rounds():
    prev = {"teacher_fingerprint": "T", "sft_teacher_fingerprint": "T", "teacher_consistent": True,
            "allow_inconsistent_teacher": False}
    assert check_round_teacher(prev, "T", "runs/x/opd") == prev
    with pytest.raises(TeacherMismatchError, match="runs/x/opd was trained on rollouts scored by teacher T but this "
                                                   "round's teacher is U"):
        check_round_teacher(prev, "U", "runs/x/opd")
    # the ablation's flags carry over from round 1
    ablation = {**prev, "sft_teacher_fingerprint": "A", "teacher_consistent": False, "allow_inconsistent_teacher": True}
    assert check_round_teacher(ablation, "T", "runs/x/opd") == ablation

"""The synthetic arithmetic task: verifiable answers, disjoint splits, reproducible from a seed."""

from __future__ import annotations

import json
import random

from lopd.data.prompts import load_prompts
from lopd.data.synthetic import Problem, make_splits, sample_problem, write_task


def test_solution_chains_are_correct():
    p = Problem((23, 45, 17))
    assert p.question == "Compute 23+45+17."
    assert p.solution("chain") == "23+45=68; 68+17=85. The answer is \\boxed{85}."
    assert p.solution("words") == "First add 45 to 23 to get 68, then add 17 to 68 to get 85. So \\boxed{85}."
    rng = random.Random(3)
    for _ in range(200):
        q = sample_problem(rng)
        assert 3 <= len(q.terms) <= 4 and q.solution().endswith(f"\\boxed{{{sum(q.terms)}}}.")


def test_splits_disjoint_and_seeded():
    a = make_splits(7, {"sft": 300, "opd": 200, "eval": 100})
    b = make_splits(7, {"sft": 300, "opd": 200, "eval": 100})
    assert a == b
    sets = [set(p.terms for p in v) for v in a.values()]
    assert all(len(s) == n for s, n in zip(sets, (300, 200, 100), strict=True))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert make_splits(8, {"sft": 300})["sft"] != a["sft"]


def test_write_task_files_load_as_prompts(tmp_path):
    paths = write_task(tmp_path, seed=1, n_teacher=50, n_sft=40, n_opd=30, n_eval=20)
    sft = load_prompts(str(paths["sft_prompts"]))
    assert len(sft) == 40 and sft[0].messages[0]["role"] == "user" and sft[0].answer is not None
    assert len(load_prompts(str(paths["opd_prompts"]))) == 30
    teacher = [json.loads(x) for x in paths["teacher_chain"].read_text().splitlines()]
    assert teacher[0]["messages"][1]["role"] == "assistant" and "\\boxed{" in teacher[0]["messages"][1]["content"]
    bench = [json.loads(x) for x in paths["benchmark"].read_text().splitlines()]
    assert len(bench) == 20 and set(bench[0]) == {"problem_id", "problem", "answer"}
    assert "assistant" in paths["corpus"].read_text()


def test_second_teacher_draw_is_disjoint_and_leaves_the_other_splits_unchanged(tmp_path):
    from lopd.data.synthetic import teacher_file

    paths = write_task(tmp_path, seed=1, n_teacher=50, n_sft=40, n_opd=30, n_eval=20)

    def questions(name: str) -> set[str]:
        rows = [json.loads(x) for x in paths[name].read_text().splitlines()]
        return {r["messages"][0]["content"] if "messages" in r else r["problem"] for r in rows}

    draw1 = questions(teacher_file("chain", 1))
    assert len(draw1) == 50 and questions(teacher_file("words", 1)) == draw1
    for other in ("teacher_chain", "sft_prompts", "opd_prompts", "benchmark"):
        assert not draw1 & questions(other), other
    # the first splits are what they were before the second draw existed (it is drawn last)
    before = make_splits(1, {"teacher": 50, "sft": 40, "eval": 20, "opd": 30})
    assert questions("opd_prompts") == {p.question for p in before["opd"]}
    assert questions("teacher_chain") == {p.question for p in before["teacher"]}


def test_validation_split_is_disjoint_from_every_other_and_changes_none_of_them(tmp_path):
    from lopd.data.synthetic import teacher_file

    without = write_task(tmp_path / "a", seed=1, n_teacher=50, n_sft=40, n_opd=30, n_eval=20)
    paths = write_task(tmp_path / "b", seed=1, n_teacher=50, n_sft=40, n_opd=30, n_eval=20, n_val=25)
    assert "validation" not in without and set(paths) == set(without) | {"validation"}
    val = [json.loads(x) for x in paths["validation"].read_text().splitlines()]
    assert len(val) == 25 and set(val[0]) == {"problem_id", "problem", "answer"}
    assert val[0]["problem_id"] == "arith-val-00000"
    questions = {r["problem"] for r in val}
    for name in ("teacher_chain", teacher_file("chain", 1), "sft_prompts", "opd_prompts", "benchmark"):
        assert paths[name].read_bytes() == without[name].read_bytes(), name  # drawn last: the others unchanged
        text = paths[name].read_text()
        assert not any(q in text for q in questions), name

"""Grading a batch of sampled responses: math in-process (math-verify), code in sandboxes run in
parallel (``eval.grader_workers`` processes, the CPUs this process may use by default), and the
grading rules in force (recorded in the eval manifest and printed in the report)."""

from __future__ import annotations

import os

from lopd.eval import lcb
from lopd.eval.benchmarks import Problem
from lopd.eval.code_grader import CodeJob, grade_code_batch
from lopd.eval.math_grader import MATH_RULES, grade_math
from lopd.eval.sandbox import SandboxLimits


def code_limits(cfg) -> SandboxLimits:
    """Sandbox limits of one sample's run: ``wall_s`` is LiveCodeBench's per-test timeout."""
    return SandboxLimits(wall_s=cfg.code_timeout_s, cpu_s=max(1, int(round(cfg.code_timeout_s))),
                         memory_mb=cfg.code_memory_mb)


def grading_rules(cfg) -> dict:
    """The math and code grading rules of an ``eval`` section (two reports compare iff these match)."""
    return {"math": dict(MATH_RULES), "code": lcb.rules(cfg.code_timeout_s, cfg.code_memory_mb)}


def grade(problems: list[Problem], responses: list[list[str]], cfg) -> list[list[tuple[bool, str | None, str]]]:
    """(correct, extracted, verdict) per sample: math in-process, code in parallel sandboxes."""
    out: list[list] = [[None] * len(r) for r in responses]
    limits = code_limits(cfg)
    jobs, where = [], []
    for i, (p, rs) in enumerate(zip(problems, responses, strict=True)):
        for j, r in enumerate(rs):
            if p.kind == "math":
                v = grade_math(r, p.answer)
                out[i][j] = (v.correct, v.extracted, v.verdict)
            else:
                jobs.append(CodeJob(r, p.tests, p.func_name, limits))
                where.append((i, j))
    workers = cfg.grader_workers or len(os.sched_getaffinity(0)) or 1
    for (i, j), v in zip(where, grade_code_batch(jobs, workers=min(workers, max(1, len(jobs)))), strict=True):
        out[i][j] = (v.correct, v.extracted, v.verdict)
    return out

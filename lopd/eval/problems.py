"""The problems of an ``eval`` stage: every benchmark of ``eval.benchmarks``, checked up front.

A bad benchmark name, an unreadable file or a math answer that cannot be parsed fails before
any inference engine starts, with an error that names the entry and the problem.
"""

from __future__ import annotations

from lopd.eval.benchmarks import REGISTRY, BenchmarkError, Problem, load_benchmark
from lopd.eval.math_grader import parse_gold


def load_problems(cfg) -> tuple[list[Problem], dict[str, str]]:
    """Every benchmark's problems and each benchmark's kind (math|code), from the ``eval`` section."""
    problems, kinds = [], {}
    for i, name in enumerate(cfg.benchmarks):
        try:
            probs = load_benchmark(name, cfg.datasets)
        except BenchmarkError as e:
            raise BenchmarkError(f"eval.benchmarks[{i}]: {e}") from None
        kinds[name] = probs[0].kind
        for p in probs:
            if p.kind == "math":
                try:
                    parse_gold(p.answer)
                except Exception as e:
                    raise BenchmarkError(f"benchmark {name}: problem {p.problem_id}: {e}") from None
        problems += probs
    return problems, kinds


def benchmark_uri(name: str, cfg) -> str:
    """Where a benchmark's problems come from (recorded as an input of the eval manifest)."""
    if name in cfg.datasets:
        return cfg.datasets[name].path
    return f"hf://datasets/{REGISTRY[name].hub_id}"

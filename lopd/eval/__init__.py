"""Evaluation: benchmark registry and loaders (``benchmarks``, ``problems``), the checkpoints to
compare (``checkpoints``), sampling and grading (``sampling``; ``grading`` over math-verify and
sandboxed code execution), metrics (avg@k with intervals, pass@k) and the report. The stage
entrypoint is ``jobs/evaluate.py``."""

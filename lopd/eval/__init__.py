"""Evaluation: benchmark registry and loaders, graders (math-verify; sandboxed code execution),
metrics (avg@k with intervals, pass@k) and the report. The stage entrypoint is ``jobs/evaluate.py``."""

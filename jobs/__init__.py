"""Container entrypoints, one per stage (``python -m jobs.<stage>``), plus ``recipes/``."""

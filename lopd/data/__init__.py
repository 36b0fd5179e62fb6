"""Prompt datasets, chat formatting, parquet schemas and synthetic tasks."""

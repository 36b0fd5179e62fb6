"""The eval stage's recipe section: benchmarks, checkpoints, sampling and the code grader's limits.

One pydantic model per component, a docstring per field (see :mod:`lopd.sections`, whose
shared models these build on).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lopd.sections import (
    MAX_BATCH,
    MAX_GPUS,
    MAX_SAMPLES,
    MAX_SHARDS,
    InferenceConfig,
    ResourcesConfig,
    SamplingConfig,
    Section,
    sampling_engine,
)


class EvalDatasetConfig(Section):
    """A benchmark read from a local file or store object instead of the hub (see lopd/eval/benchmarks.py)."""

    path: str = Field(min_length=1)
    """JSONL or parquet file: a path or a store URI (s3://…, file://…); or a local directory (a copy
    of the hub dataset: every .jsonl / .parquet file below it)."""
    kind: Literal["math", "code"] | None = None
    """math (graded with math-verify) or code (executed tests); None = the registry benchmark's kind."""
    fields: dict[str, str] = {}
    """Field mapping, schema name -> name in the file, e.g. ``{problem: question, answer: final}``.
    Math schema: ``id``, ``problem``, ``answer``. Code schema (LiveCodeBench): ``question_id``,
    ``question_content``, ``starter_code``, ``public_test_cases``, ``private_test_cases``, ``metadata``."""
    prompt_template: str | None = None
    """Python format string for the user turn (``{problem}``; code also ``{starter_code}``);
    None = the registry's default prompt for the kind."""


class EvalConfig(Section):
    """Stage ``eval``: avg@k on math and code benchmarks."""

    benchmarks: list[str] = ["aime24", "aime25", "hmmt25", "lcb_v5", "lcb_v6"]
    """Benchmark names from the registry (or local datasets declared in ``datasets``)."""
    datasets: dict[str, EvalDatasetConfig] = {}
    """Benchmarks from local / store files by name: a registry name (aime24, …) reads that file
    in the registry's schema instead of the hub; any other name declares a new benchmark (``kind`` required)."""
    checkpoints: list[str] = []
    """Checkpoints to evaluate (store URIs or paths, each with a MANIFEST.json; ``label=uri`` names the
    column in the report); empty = this run's sft and opd outputs."""
    code_timeout_s: float = Field(6.0, gt=0.0, le=3600.0)
    """Timeout per test, LiveCodeBench's rule (its default 6 s; at most 3600); a program's whole run also
    has LiveCodeBench's global limit ``(timeout + 1) * tests + 5`` s (docs/eval.md)."""
    code_memory_mb: int = Field(1024, ge=64, le=2**20)
    """Address-space limit of a program under test, in MiB (at most 2^20, i.e. 1 TiB)."""
    grader_workers: int = Field(0, ge=0, le=MAX_GPUS)
    """Parallel processes grading code (at most 1024); 0 = one per CPU this process may run on."""
    part_size: int = Field(64, ge=1, le=MAX_BATCH)
    """Problems per resumable part within a shard (each part: generate k samples, grade, save; at
    most 2^20)."""
    k: int = Field(16, ge=1, le=MAX_SAMPLES)
    """Samples per problem (avg@k; at most 2^14)."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_tokens=32768)
    """Sampling for evaluation."""
    inference: InferenceConfig = InferenceConfig()
    """Engine."""
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    """Indexed-Job completions (at most 10^4)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""

    @field_validator("inference")
    @classmethod
    def _samples(cls, v: InferenceConfig) -> InferenceConfig:
        return sampling_engine(v)

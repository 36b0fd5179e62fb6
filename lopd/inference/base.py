"""The one small interface every inference backend implements.

(a) ``generate``: sample completions for already-tokenised chat prompts, returning token
ids exactly as sampled (never decoded and re-encoded), the text, the finish reason and the
sampler's own log-prob of every sampled token. (b) ``score``: the log-prob of every given
response token under the model, given prompt and response token ids; ``score_topk`` adds the
model's ``k`` most likely tokens and their log-probs at every response position. Also
:func:`context_length`, the context limit of a model without starting an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lopd.recipe import InferenceConfig, SamplingConfig


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled response tokens; ends with the end-of-turn token when generation stopped on it."""
    text: str
    """Decoded text (for humans and graders; never re-tokenised)."""
    finish_reason: str
    """"stop" (end-of-turn / EOS) or "length" (max_tokens reached)."""
    logprobs: list[float]
    """The sampler's log-prob of each sampled token (same length as token_ids): raw
    ``log_softmax(logits)`` or, from a backend started with ``logprobs_mode="processed"``, under
    the distribution sampled from (temperature and top-p applied)."""


@dataclass
class TopkScores:
    """A response scored with the model's top-k at every position (``L`` tokens)."""

    logprobs: np.ndarray
    """float32 ``[L]``: log p(response_t | prompt, response_<t), as :meth:`Backend.score` returns."""
    topk_ids: np.ndarray
    """int32 ``[L, k]``: the ``k`` most likely next tokens at each position, most likely first."""
    topk_logprobs: np.ndarray
    """float32 ``[L, k]``: their raw (temperature-1) log-probs, descending."""


class Backend(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt; ``seeds[i]`` seeds prompt i (reproducible shards)."""
        ...

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[np.ndarray]:
        """float32 log p(response_t | prompt, response_<t) per response token, one array per pair."""
        ...

    def score_topk(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   k: int) -> list[TopkScores]:
        """:meth:`score` plus the ``k`` most likely tokens and their log-probs at every response position."""
        ...

    def close(self) -> None:
        """Release the engine (memory, worker processes)."""
        ...


def context_length(model_path: str | Path, inference_cfg: InferenceConfig | None = None) -> int:
    """Tokens of context (prompt + response) without starting an engine: ``max_model_len`` or the
    model config's ``max_position_embeddings``, whichever is smaller."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    n = int(cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings") or 0)
    limit = inference_cfg.max_model_len if inference_cfg else None
    if limit and n:
        return min(limit, n)
    return limit or n or 1 << 30

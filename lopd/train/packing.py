"""Micro-batches under a token budget: packed rows (no cross-sequence attention) or padded rows.

A :class:`Seq` is a token list plus ``labels``: ``labels[t]`` is True when token ``t`` is a
training target (predicted from position ``t - 1``). A :class:`MicroBatch` holds ``[B, L]``
tensors; ``select[b, p]`` marks the positions whose *next* token is a target, in row-major
order, so per-target extras (teacher log-probs...) concatenated in sequence order line up
with the selected positions.

Packing puts several sequences in one row and restarts ``position_ids`` at 0 for each; with
no 2-D attention mask transformers then builds a block-diagonal causal mask (each sequence
attends only to itself), so a packed row computes exactly what the sequences would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Seq:
    tokens: np.ndarray
    """int64 ``[L]``: the whole sequence (prompt + response)."""
    labels: np.ndarray
    """bool ``[L]``: token t is a target (labels[0] is always False)."""
    index: int = 0
    """Position of the sequence in its global batch (for per-sequence aggregation)."""
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-target arrays, each ``[labels.sum()]`` (e.g. teacher_logprobs)."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.labels.sum())


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L] int64: token at p+1 (0 where none)
    select: torch.Tensor  # [B, L] bool: positions whose next token is a target
    seq_index: torch.Tensor  # [N] int64: global sequence index of each selected position
    attention_mask: torch.Tensor | None  # [B, L] for padded rows, None for packed rows
    extras: dict[str, torch.Tensor]  # name -> [N] float32, aligned with selected positions
    num_seqs: int = 0
    real_tokens: int = 0

    @property
    def num_targets(self) -> int:
        return int(self.select.sum())

    def to(self, device: torch.device | str) -> MicroBatch:
        mv = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets), mv(self.select),
                          mv(self.seq_index), mv(self.attention_mask),
                          {k: v.to(device) for k, v in self.extras.items()}, self.num_seqs, self.real_tokens)


def group_by_budget(lengths: list[int], budget: int, padded: bool = False) -> list[list[int]]:
    """Greedy in-order grouping of sequence indices into micro-batches.

    packed: sum of lengths <= budget; padded: count * max length <= budget. A sequence longer
    than the budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    total = longest = 0
    for i, n in enumerate(lengths):
        cost = (len(cur) + 1) * max(longest, n) if padded else total + n
        if cur and cost > budget:
            groups.append(cur)
            cur, total, longest = [], 0, 0
        cur.append(i)
        total += n
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def _row(seqs: list[Seq]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ids = np.concatenate([s.tokens for s in seqs])
    pos = np.concatenate([np.arange(len(s)) for s in seqs])
    nxt = [np.concatenate([s.tokens[1:], [0]]) for s in seqs]
    sel = [np.concatenate([s.labels[1:], [False]]) for s in seqs]
    idx = np.concatenate([np.full(s.num_targets, s.index) for s in seqs])
    return ids, pos, np.concatenate(nxt), np.concatenate(sel), idx


def _extras(seqs: list[Seq]) -> dict[str, torch.Tensor]:
    names = seqs[0].extras.keys() if seqs else ()
    return {k: torch.from_numpy(np.concatenate([s.extras[k] for s in seqs]).astype(np.float32)) for k in names}


def pack(seqs: list[Seq], budget: int) -> list[MicroBatch]:
    """One packed row per micro-batch (``B = 1``), at most ``budget`` tokens each."""
    out = []
    for g in group_by_budget([len(s) for s in seqs], budget):
        group = [seqs[i] for i in g]
        ids, pos, nxt, sel, idx = _row(group)
        t = lambda a: torch.from_numpy(np.asarray(a)).unsqueeze(0)  # noqa: E731
        out.append(MicroBatch(t(ids).long(), t(pos).long(), t(nxt).long(), t(sel).bool(),
                              torch.from_numpy(idx).long(), None, _extras(group), len(group), len(ids)))
    return out


def pad(seqs: list[Seq], budget: int, pad_id: int = 0) -> list[MicroBatch]:
    """Padded rows (one sequence per row, right-padded, with an attention mask), ``B * L <= budget``."""
    out = []
    for g in group_by_budget([len(s) for s in seqs], budget, padded=True):
        group = [seqs[i] for i in g]
        width = max(len(s) for s in group)
        shape = (len(group), width)
        ids, pos, nxt = (np.full(shape, pad_id, np.int64) for _ in range(3))
        sel, att = np.zeros(shape, bool), np.zeros(shape, np.int64)
        for r, s in enumerate(group):
            n = len(s)
            r_ids, r_pos, r_nxt, r_sel, _ = _row([s])
            ids[r, :n], pos[r, :n], nxt[r, :n], sel[r, :n], att[r, :n] = r_ids, r_pos, r_nxt, r_sel, 1
        idx = np.concatenate([np.full(s.num_targets, s.index) for s in group])
        out.append(MicroBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(nxt),
                              torch.from_numpy(sel), torch.from_numpy(idx).long(), torch.from_numpy(att),
                              _extras(group), len(group), sum(len(s) for s in group)))
    return out


def make_micro_batches(seqs: list[Seq], budget: int, packing: bool = True) -> list[MicroBatch]:
    return pack(seqs, budget) if packing else pad(seqs, budget)


def dummy_micro_batch() -> MicroBatch:
    """A 2-token micro-batch with no targets: ranks with fewer micro-batches run these so every
    rank does the same number of forward/backward passes (ZeRO collectives stay matched)."""
    z = torch.zeros(1, 2, dtype=torch.long)
    return MicroBatch(z, torch.arange(2).unsqueeze(0), z, torch.zeros(1, 2, dtype=torch.bool),
                      torch.zeros(0, dtype=torch.long), None, {}, 0, 0)

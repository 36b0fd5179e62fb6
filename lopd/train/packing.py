"""Micro-batches under a token budget: packed rows (no cross-sequence attention) or padded rows.

A :class:`Seq` is a token list plus ``labels``: ``labels[t]`` is True when token ``t`` is a
training target (predicted from position ``t - 1``). A :class:`MicroBatch` holds ``[B, W]``
tensors; ``select[b, p]`` marks the positions whose *next* token is a target, in row-major
order, and ``seq_index`` / ``extras`` list the targets in that same order (sequence by
sequence, as the sequences lie in the rows), so per-target values line up with the selected
positions whatever the layout (an extra is ``[N]`` or, like the teacher's top-k, ``[N, k]``).

Packing puts several sequences side by side in each row and restarts ``position_ids`` at 0
for each. With no 2-D attention mask, transformers (sdpa / eager) turns the restarts into a
block-diagonal causal mask per row (each sequence attends only to itself), so a packed row
computes exactly what its sequences would alone. That mask is dense: attention costs
``W^2`` per row whatever the sequences in it, so one row of the whole budget (``budget^2``)
is slower than padding. :func:`pack` therefore packs each micro-batch into several rows of a
bounded width ``W`` (the micro-batch's longest sequence), ``rows * W <= budget``: the
quadratic term is ``rows * W^2``, close to ``sum_i L_i^2`` when the lengths are sorted.

A row's slack after its last sequence is filler (token 0, no targets) whose positions
continue the last sequence's: causal attention never lets a real token see a later one, and
a micro-batch whose rows each hold one sequence keeps sdpa's mask-free ``is_causal`` path.

FlashAttention-2 in transformers only detects packed sequences in a single row; the
training engine flattens the rows into one (``lopd.train.engine.LogprobModel``), which is
exact because every row starts a new sequence at position 0.

Flat packing (:func:`flat_pack`, ``train.attention: varlen``) makes each micro-batch ONE row of its
sequences back to back (greedy in order under the budget), no filler, and computes the
sequence boundaries on the host (``cu_seqlens`` int32 ``[S+1]``, ``max_seqlen``): a varlen
attention kernel (:mod:`lopd.train.varlen`) attends within each sequence, with no mask and no
device-side boundary detection, at ``sum_i L_i^2`` attention cost.
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
    """Per-target arrays, each ``[labels.sum()]`` (e.g. teacher_logprobs) or ``[labels.sum(), k]``
    (the teacher's top-k ids and log-probs)."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.labels.sum())


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, W] int64
    position_ids: torch.Tensor  # [B, W] int64
    targets: torch.Tensor  # [B, W] int64: token at p+1 (0 where none)
    select: torch.Tensor  # [B, W] bool: positions whose next token is a target
    seq_index: torch.Tensor  # [N] int64: global sequence index of each selected position
    attention_mask: torch.Tensor | None  # [B, W] for padded rows, None for packed rows
    extras: dict[str, torch.Tensor]  # name -> [N] or [N, k] (float32; int64 for ids), aligned with selected positions
    num_seqs: int = 0
    real_tokens: int = 0
    select_index: torch.Tensor | None = None
    """int64 ``[N]``: the flat (row-major) positions of ``select``, computed on the host when the
    micro-batch is built, so gathers on the device index with it instead of a boolean mask (a
    boolean-mask gather waits for the device to count the selected positions)."""
    cu_seqlens: torch.Tensor | None = None
    """int32 ``[S+1]``: the sequence boundaries of a flat micro-batch (one row, sequence ``s`` at
    columns ``cu_seqlens[s]:cu_seqlens[s+1]``); None for the other layouts."""
    max_seqlen: int | None = None
    """The longest sequence of a flat micro-batch (a host int: the kernels need no device read)."""

    def __post_init__(self) -> None:
        if self.select_index is None:  # built from host tensors (the constructors here pass it)
            self.select_index = torch.from_numpy(np.flatnonzero(self.select.numpy(force=True)))

    @property
    def num_targets(self) -> int:
        return int(self.select_index.numel())  # a shape: no device sync

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy on ``device`` (host tensors pinned first on a GPU, so the copies run asynchronously)."""
        pin = torch.device(device).type == "cuda"

        def mv(t):
            if t is None:
                return None
            return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=pin)

        return MicroBatch(mv(self.input_ids), mv(self.position_ids), mv(self.targets), mv(self.select),
                          mv(self.seq_index), mv(self.attention_mask),
                          {k: mv(v) for k, v in self.extras.items()}, self.num_seqs, self.real_tokens,
                          mv(self.select_index), mv(self.cu_seqlens), self.max_seqlen)


Layout = list[list[int]]  # one micro-batch: rows -> sequence indices, left to right


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


def _next_fit(idx: list[int], lengths: list[int], width: int) -> Layout:
    """Rows of ``width`` filled in order: a new row when the next sequence does not fit."""
    rows: Layout = []
    fill = width
    for i in idx:
        if fill + lengths[i] > width:
            rows.append([])
            fill = 0
        rows[-1].append(i)
        fill += lengths[i]
    return rows


def layout_in_order(lengths: list[int], budget: int) -> list[Layout]:
    """Micro-batches of consecutive sequences, rows filled in order (next fit), ``rows * W <= budget``
    with ``W`` the micro-batch's longest sequence. Reading the rows row-major gives the input order."""
    out: list[Layout] = []
    cur: list[int] = []
    for i in range(len(lengths)):
        cand = cur + [i]
        width = max(lengths[j] for j in cand)
        if cur and len(_next_fit(cand, lengths, width)) * width > budget:
            out.append(_next_fit(cur, lengths, max(lengths[j] for j in cur)))
            cand = [i]
        cur = cand
    if cur:
        out.append(_next_fit(cur, lengths, max(lengths[j] for j in cur)))
    return out


def layout_sorted(lengths: list[int], budget: int) -> list[Layout]:
    """First-fit decreasing: the longest remaining sequence sets the width ``W`` of a micro-batch
    of ``max(1, budget // W)`` rows; every remaining sequence, longest first, goes into the first
    row with room. Lengths within a micro-batch are similar, so ``rows * W^2`` stays close to
    ``sum L_i^2`` and the filler is small."""
    remaining = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[Layout] = []
    while remaining:
        width = lengths[remaining[0]]
        rows: Layout = [[] for _ in range(max(1, budget // width))]
        free = [width] * len(rows)
        left = []
        for i in remaining:
            r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
            if r is None:
                left.append(i)
            else:
                rows[r].append(i)
                free[r] -= lengths[i]
        out.append([row for row in rows if row])
        remaining = left
    return out


def _extras(seqs: list[Seq]) -> dict[str, torch.Tensor]:
    """Per-target extras of ``seqs`` concatenated along the targets: ``[N]`` or ``[N, k]``, float32
    (integer arrays, e.g. token ids, int64)."""
    names = seqs[0].extras.keys() if seqs else ()
    out = {}
    for k in names:
        a = np.concatenate([s.extras[k] for s in seqs])
        out[k] = torch.from_numpy(a.astype(np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32))
    return out


def _packed(seqs: list[Seq], layout: Layout) -> MicroBatch:
    """Tensors of one packed micro-batch; row width = its fullest row."""
    width = max(sum(len(seqs[i]) for i in row) for row in layout)
    shape = (len(layout), width)
    ids, pos, nxt = (np.zeros(shape, np.int64) for _ in range(3))
    sel = np.zeros(shape, bool)
    order = [seqs[i] for row in layout for i in row]  # row-major: the order of the targets
    for r, row in enumerate(layout):
        o = 0
        for i in row:
            s = seqs[i]
            n = len(s)
            ids[r, o:o + n], pos[r, o:o + n] = s.tokens, np.arange(n)
            nxt[r, o:o + n - 1], sel[r, o:o + n - 1] = s.tokens[1:], s.labels[1:]
            o += n
        pos[r, o:] = np.arange(pos[r, o - 1] + 1, pos[r, o - 1] + 1 + width - o)  # filler continues the row
    idx = np.concatenate([np.full(s.num_targets, s.index, np.int64) for s in order])
    return MicroBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(nxt), torch.from_numpy(sel),
                      torch.from_numpy(idx), None, _extras(order), len(order), sum(len(s) for s in order),
                      torch.from_numpy(np.flatnonzero(sel)))


def pack(seqs: list[Seq], budget: int, sort: bool = False) -> list[MicroBatch]:
    """Packed micro-batches of ``rows x W`` tokens, ``rows * W <= budget`` (a sequence longer than
    the budget is a micro-batch of its own).

    ``sort=False`` keeps the input order (targets of all micro-batches, concatenated, are in
    the order of ``seqs``: callers may split them by length); ``sort=True`` packs first-fit
    decreasing (:func:`layout_sorted`: less filler, smaller widths; the order of the targets
    is then given by ``seq_index`` and ``extras`` only). Training uses ``sort=True``.
    """
    lengths = [len(s) for s in seqs]
    layouts = layout_sorted(lengths, budget) if sort else layout_in_order(lengths, budget)
    return [_packed(seqs, lay) for lay in layouts]


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
            ids[r, :n], pos[r, :n], nxt[r, :n - 1], sel[r, :n - 1] = s.tokens, np.arange(n), s.tokens[1:], s.labels[1:]
            att[r, :n] = 1
        idx = np.concatenate([np.full(s.num_targets, s.index, np.int64) for s in group])
        out.append(MicroBatch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(nxt),
                              torch.from_numpy(sel), torch.from_numpy(idx), torch.from_numpy(att),
                              _extras(group), len(group), sum(len(s) for s in group),
                              torch.from_numpy(np.flatnonzero(sel))))
    return out


def flat_pack(seqs: list[Seq], budget: int) -> list[MicroBatch]:
    """Flat micro-batches: each ONE row ``[1, sum L_i]`` of consecutive sequences (greedy in order,
    :func:`group_by_budget`; a sequence longer than the budget alone), no filler, positions
    restarting at 0 per sequence, with the host-side boundaries ``cu_seqlens`` / ``max_seqlen``.
    The concatenated targets of all micro-batches are in the order of ``seqs``."""
    out = []
    for g in group_by_budget([len(s) for s in seqs], budget):
        mb = _packed(seqs, [g])
        lengths = [len(seqs[i]) for i in g]
        mb.cu_seqlens = torch.from_numpy(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        mb.max_seqlen = max(lengths)
        out.append(mb)
    return out


def make_micro_batches(seqs: list[Seq], budget: int, packing: bool = True, flat: bool = False
                       ) -> list[MicroBatch]:
    """The training layout: first-fit-decreasing packed rows, padded rows (``packing=False``, the
    baseline), or with ``flat`` (whatever ``packing``) one row per micro-batch with its sequence
    boundaries (:func:`flat_pack`, for the varlen attention)."""
    if flat:
        return flat_pack(seqs, budget)
    return pack(seqs, budget, sort=True) if packing else pad(seqs, budget)


def dummy_micro_batch() -> MicroBatch:
    """A 2-token micro-batch with one selected position: ranks with fewer micro-batches run these
    (with the loss multiplied by 0) so every rank does the same forward/backward passes through
    the same modules. ZeRO-3 needs both: every parameter fetch is a collective, and a rank whose
    module order differs from its recorded trace (an empty selection skips the LM head's
    recomputation in the backward) re-records it with collectives the other ranks never join."""
    z = torch.zeros(1, 2, dtype=torch.long)
    return MicroBatch(z, torch.arange(2).unsqueeze(0), z, torch.tensor([[True, False]]),
                      torch.zeros(1, dtype=torch.long), None, {}, 0, 0)

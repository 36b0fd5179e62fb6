"""Training inputs, read via their manifests: the precompute parquet (OPD) here, the SFT data in
:mod:`lopd.train.sft_rows` (on the helpers below).

Every file is verified against the manifest's digest and size before any row is used, then
validated while it streams in (``pyarrow`` record batches per file); a bad row is a
:class:`TrainDataError` naming the file, the row, the prompt and the column. A duplicated row
identity (``(prompt_id, sample_index)``; a prompt id in SFT data) names both rows, and an empty
published dataset is refused. The
precompute manifest's lineage must record a consistent teacher unless the recipe allows the
ablation (``allow_inconsistent_teacher``). With ``teacher_topk: k > 0`` in that lineage, the
teacher's top-k columns are read too (straight from the arrow buffers, not as Python lists) and
reach the micro-batches as ``[num_targets, k]`` extras.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd import LopdError
from lopd.data.schemas import TOPK_COLUMNS, precompute_schema
from lopd.layout import manifest_key
from lopd.manifest import FileEntry, Manifest, ManifestError, read_manifest
from lopd.store import Store
from lopd.train.packing import Seq

LOGPROB_COLUMNS = ("teacher_logprobs", "rollout_logprobs")
OPTIONAL_PRECOMPUTE_COLUMNS = ("finish_reason",)  # absent from data written before it was recorded
POSITIVE_TOL = 1e-4  # log-probs above this are not log-probs


class TrainDataError(LopdError):
    """Unusable training data; the message names the file, row and column."""


@dataclass
class OpdSample:
    """One rollout with its per-token log-probs (all float32 arrays of the response's length)."""

    prompt_id: str
    sample_index: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    teacher_logprobs: np.ndarray
    rollout_logprobs: np.ndarray
    finish_reason: str | None = None
    """"stop" or "length" (truncated at max_tokens; nothing follows the cut, so nothing is masked);
    None for data written without the column."""
    teacher_topk_ids: np.ndarray | None = None
    """int32 ``[len(response), k]``: the teacher's top-k tokens at each position (None: not stored)."""
    teacher_topk_logprobs: np.ndarray | None = None
    """``[len(response), k]`` (float16 as stored): their log-probs, most likely first."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_seq(self, index: int) -> Seq:
        tokens = np.concatenate([self.prompt_ids, self.response_ids]).astype(np.int64)
        labels = np.zeros(len(tokens), bool)
        labels[len(self.prompt_ids):] = True
        extras = {"teacher_logprobs": self.teacher_logprobs, "rollout_logprobs": self.rollout_logprobs}
        if self.teacher_topk_ids is not None:
            extras.update(teacher_topk_ids=self.teacher_topk_ids, teacher_topk_logprobs=self.teacher_topk_logprobs)
        return Seq(tokens, labels, index, extras)


# --------------------------------------------------------------------------- manifests


def data_files(m: Manifest) -> list[str]:
    return [f.path for f in data_entries(m)]


def data_entries(m: Manifest) -> list[FileEntry]:
    """The manifest's parquet files (path, size, digest), sorted by path."""
    return sorted((f for f in m.files if f.path.endswith(".parquet")), key=lambda f: f.path)


def open_precompute(store: Store, prefix: str, allow_inconsistent_teacher: bool) -> tuple[Manifest, str]:
    """Read the precompute manifest and enforce the teacher-consistency record in its lineage."""
    try:
        m, sha = read_manifest(store, prefix)
    except ManifestError as e:
        raise TrainDataError(f"precompute data: {e}") from None
    lin = m.lineage
    where = store.url(manifest_key(prefix))
    if "teacher_consistent" not in lin:
        raise TrainDataError(f"{where}: lineage.teacher_consistent is missing (cannot check the teacher)")
    if not lin["teacher_consistent"] and not allow_inconsistent_teacher:
        raise TrainDataError(
            f"{where}: lineage.teacher_consistent is false (scored by teacher {lin.get('teacher_fingerprint')}, "
            f"SFT data from {lin.get('sft_teacher_fingerprint')}); refusing to train on it "
            "(set allow_inconsistent_teacher: true only for the ablation)")
    if not data_files(m):
        raise TrainDataError(f"{where}: lists no parquet files")
    return m, sha


def _check_schema(schema: pa.Schema, want: pa.Schema, where: str, optional: tuple[str, ...] = ()) -> None:
    for f in want:
        if f.name not in schema.names and f.name in optional:
            continue
        if f.name not in schema.names:
            raise TrainDataError(f"{where}: column {f.name!r} is missing")
        got = schema.field(f.name).type
        if not (got == f.type or (pa.types.is_list(got) and pa.types.is_list(f.type)
                                  and pa.types.is_integer(got.value_type) == pa.types.is_integer(f.type.value_type))):
            raise TrainDataError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")


def record_batches(store: Store, prefix: str, m: Manifest, schema: pa.Schema, columns: list[str],
             optional: tuple[str, ...] = ()) -> Iterator[tuple[str, int, dict[str, list]]]:
    """Record batches of every data file, each read from a local copy verified against the
    manifest's digest and size before any row is used (:meth:`Store.open_verified`)."""
    for f in data_entries(m):
        where = store.url(f"{prefix}/{f.path}")
        with store.open_verified(f"{prefix}/{f.path}", f.digest, f.bytes) as fh:
            pf = pq.ParquetFile(fh)
            _check_schema(pf.schema_arrow, schema, where, optional)
            cols = [c for c in columns if c in pf.schema_arrow.names or c not in optional]
            row0 = 0
            for rb in pf.iter_batches(batch_size=1024, columns=cols):
                batch = {c: (_list_arrays(rb.column(c)) if c in TOPK_COLUMNS.names else rb.column(c).to_pylist())
                         for c in rb.schema.names}
                yield where, row0, batch
                row0 += rb.num_rows


def _list_arrays(col: pa.ListArray) -> list[np.ndarray | None]:
    """A list column as one numpy view per row (None for a null row), without Python lists."""
    offsets, values = col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)
    null = col.is_null().to_numpy(zero_copy_only=False)
    return [None if null[i] else values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def require_topk(lineage: dict, where: str) -> int:
    """The ``k`` of precompute data stored with the teacher's top-k (``opd.objective: topk`` needs it);
    a :class:`TrainDataError` for data without it."""
    k = int(lineage.get("teacher_topk") or 0)
    if k <= 0:
        raise TrainDataError(f"{where}: opd.objective topk needs the teacher's top-k, but this precompute data "
                             "has none (lineage.teacher_topk is 0 or missing; rerun precompute with "
                             "precompute.teacher_topk > 0)")
    return k


def topk_arrays(row: dict, n: int, k: int, vocab_size: int | None, ctx: str):
    """A precompute row's top-k columns (``n · k`` values each) as ``[n, k]`` arrays (ids, log-probs as
    stored), checked: lengths, ids in the vocabulary, finite log-probs <= 0; a
    :class:`TrainDataError` naming the column otherwise."""
    out = []
    for col in ("teacher_topk_ids", "teacher_topk_logprobs"):
        v = row.get(col)
        if v is None or len(v) != n * k:
            got = "null" if v is None else f"length {len(v)}"
            raise TrainDataError(f"{ctx}: column {col}: {got} != response length {n} x teacher_topk {k}")
        out.append(np.asarray(v).reshape(n, k))
    ids, lps = out
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise TrainDataError(f"{ctx}: column teacher_topk_ids: token id out of range [0, {vocab_size})")
    if not np.isfinite(lps).all() or (lps > POSITIVE_TOL).any():
        raise TrainDataError(f"{ctx}: column teacher_topk_logprobs: a value is not a finite log-prob <= 0")
    return ids, lps


def validate_opd_row(row: dict[str, Any], where: str, vocab_size: int | None = None, topk: int = 0) -> OpdSample:
    """Check one precompute row (with ``topk > 0``, its top-k columns of ``len(response) * topk``
    values too); raise :class:`TrainDataError` naming the column."""
    pid = row.get("prompt_id")
    ctx = f"{where} (prompt_id={pid!r})"
    for col in ("prompt_token_ids", "response_token_ids", *LOGPROB_COLUMNS):
        if row.get(col) is None:
            raise TrainDataError(f"{ctx}: column {col}: is null")
    resp = np.asarray(row["response_token_ids"], np.int64)
    prompt = np.asarray(row["prompt_token_ids"], np.int64)
    if len(resp) == 0:
        raise TrainDataError(f"{ctx}: column response_token_ids: empty response")
    if len(prompt) == 0:
        raise TrainDataError(f"{ctx}: column prompt_token_ids: empty prompt")
    for col, ids in (("prompt_token_ids", prompt), ("response_token_ids", resp)):
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise TrainDataError(f"{ctx}: column {col}: token id out of range [0, {vocab_size})")
    lps = {}
    for col in LOGPROB_COLUMNS:
        lp = np.asarray(row[col], np.float32)
        if len(lp) != len(resp):
            raise TrainDataError(f"{ctx}: column {col}: length {len(lp)} != response_token_ids length {len(resp)}")
        bad = ~np.isfinite(lp)
        if bad.any():
            i = int(np.argmax(bad))
            raise TrainDataError(f"{ctx}: column {col}: non-finite value {lp[i]} at token {i}")
        if (lp > POSITIVE_TOL).any():
            i = int(np.argmax(lp > POSITIVE_TOL))
            raise TrainDataError(f"{ctx}: column {col}: positive log-prob {lp[i]:.4g} at token {i}")
        lps[col] = lp
    finish = row.get("finish_reason")
    if finish is not None and finish not in ("stop", "length"):
        raise TrainDataError(f"{ctx}: column finish_reason: {finish!r} is not 'stop' or 'length'")
    ids, top = topk_arrays(row, len(resp), topk, vocab_size, ctx) if topk else (None, None)
    return OpdSample(str(pid), int(row.get("sample_index") or 0), prompt, resp,
                     lps["teacher_logprobs"], lps["rollout_logprobs"], finish, ids, top)


def load_opd_samples(store: Store, prefix: str, m: Manifest, max_seq_len: int,
                     vocab_size: int | None = None) -> tuple[list[OpdSample], int]:
    """Stream and validate every precompute row (with the teacher's top-k when the lineage records
    ``teacher_topk > 0``); returns (samples, number skipped as too long)."""
    topk = int(m.lineage.get("teacher_topk") or 0)
    cols = ["prompt_id", "sample_index", "prompt_token_ids", "response_token_ids", *LOGPROB_COLUMNS,
            *OPTIONAL_PRECOMPUTE_COLUMNS, *(TOPK_COLUMNS.names if topk else ())]
    out, skipped = [], 0
    seen: dict[tuple[str, int], tuple[str, int]] = {}
    schema = precompute_schema(topk)
    for where, row0, batch in record_batches(store, prefix, m, schema, cols, OPTIONAL_PRECOMPUTE_COLUMNS):
        n = len(batch["prompt_id"])
        for i in range(n):
            s = validate_opd_row({c: batch[c][i] for c in cols if c in batch}, f"{where}: row {row0 + i}",
                                 vocab_size, topk)
            check_unique(seen, (s.prompt_id, s.sample_index), f"{where}: row {row0 + i}", "(prompt_id, sample_index)")
            if len(s) > max_seq_len:
                skipped += 1
                continue
            out.append(s)
    if not seen:
        raise TrainDataError(f"{store.url(prefix)}: the published precompute data holds no rows")
    if not out:
        raise TrainDataError(f"{store.url(prefix)}: no usable rows (all {skipped} longer than max_seq_len)")
    out.sort(key=lambda s: (s.prompt_id, s.sample_index))  # independent of shard / file order
    return out, skipped


def check_unique(seen: dict, key: Any, where: str, what: str, limit: int = 1) -> None:
    """Record ``key`` at ``where``; raise naming the first and this row when it is seen more than
    ``limit`` times."""
    first, count = seen.get(key, (where, 0))
    if count >= limit:
        raise TrainDataError(f"duplicate {what} {key!r}: {first} and {where}")
    seen[key] = (first, count + 1)


# --------------------------------------------------------------------------- SFT data


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of ``n`` items used in ``epoch`` (deterministic in seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Dataset indices of optimizer step ``step``: consecutive slices of per-epoch permutations
    (a batch may straddle two epochs). Pure in (n, step, batch, seed): resumes reproduce it."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, off = divmod(start + len(out), n)
        perm = epoch_order(n, epoch, seed)
        out.extend(perm[off:off + global_batch - len(out)].tolist())
    return out


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's part of a global batch: every ``world``-th item."""
    return items[rank::world]

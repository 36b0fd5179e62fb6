"""Training inputs: the precompute parquet (OPD) and the SFT data, read via their manifests.

Every file is verified against the manifest's sha256 and size before any row is used, then
validated while it streams in (``pyarrow`` record batches per file); a bad row is a
:class:`TrainDataError` naming the file, the row, the prompt and the column. A duplicated row
identity (``(prompt_id, sample_index)``; a prompt id in SFT data) names both rows, and an empty
published dataset is refused. The
precompute manifest's lineage must record a consistent teacher unless the recipe allows the
ablation (``allow_inconsistent_teacher``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd import LopdError
from lopd.data.chat import ChatFormatError, sft_target
from lopd.data.schemas import PRECOMPUTE, SFT_DATA
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

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_seq(self, index: int) -> Seq:
        tokens = np.concatenate([self.prompt_ids, self.response_ids]).astype(np.int64)
        labels = np.zeros(len(tokens), bool)
        labels[len(self.prompt_ids):] = True
        return Seq(tokens, labels, index, {"teacher_logprobs": self.teacher_logprobs,
                                           "rollout_logprobs": self.rollout_logprobs})


# --------------------------------------------------------------------------- manifests


def data_files(m: Manifest) -> list[str]:
    return [f.path for f in data_entries(m)]


def data_entries(m: Manifest) -> list[FileEntry]:
    """The manifest's parquet files (path, size, sha256), sorted by path."""
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


def _batches(store: Store, prefix: str, m: Manifest, schema: pa.Schema, columns: list[str],
             optional: tuple[str, ...] = ()) -> Iterator[tuple[str, int, dict[str, list]]]:
    """Record batches of every data file, each read from a local copy verified against the
    manifest's sha256 and size before any row is used (:meth:`Store.open_verified`)."""
    for f in data_entries(m):
        where = store.url(f"{prefix}/{f.path}")
        with store.open_verified(f"{prefix}/{f.path}", f.sha256, f.bytes) as fh:
            pf = pq.ParquetFile(fh)
            _check_schema(pf.schema_arrow, schema, where, optional)
            cols = [c for c in columns if c in pf.schema_arrow.names or c not in optional]
            row0 = 0
            for rb in pf.iter_batches(batch_size=1024, columns=cols):
                yield where, row0, rb.to_pydict()
                row0 += rb.num_rows


def validate_opd_row(row: dict[str, Any], where: str, vocab_size: int | None = None) -> OpdSample:
    """Check one precompute row; raise :class:`TrainDataError` naming the column."""
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
    return OpdSample(str(pid), int(row.get("sample_index") or 0), prompt, resp,
                     lps["teacher_logprobs"], lps["rollout_logprobs"], finish)


def load_opd_samples(store: Store, prefix: str, m: Manifest, max_seq_len: int,
                     vocab_size: int | None = None) -> tuple[list[OpdSample], int]:
    """Stream and validate every precompute row; returns (samples, number skipped as too long)."""
    cols = ["prompt_id", "sample_index", "prompt_token_ids", "response_token_ids", *LOGPROB_COLUMNS,
            *OPTIONAL_PRECOMPUTE_COLUMNS]
    out, skipped = [], 0
    seen: dict[tuple[str, int], tuple[str, int]] = {}
    for where, row0, batch in _batches(store, prefix, m, PRECOMPUTE, cols, OPTIONAL_PRECOMPUTE_COLUMNS):
        n = len(batch["prompt_id"])
        for i in range(n):
            s = validate_opd_row({c: batch[c][i] for c in cols if c in batch}, f"{where}: row {row0 + i}",
                                 vocab_size)
            _unique(seen, (s.prompt_id, s.sample_index), f"{where}: row {row0 + i}", "(prompt_id, sample_index)")
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


def _unique(seen: dict, key: Any, where: str, what: str, limit: int = 1) -> None:
    """Record ``key`` at ``where``; raise naming the first and this row when it is seen more than
    ``limit`` times."""
    first, count = seen.get(key, (where, 0))
    if count >= limit:
        raise TrainDataError(f"duplicate {what} {key!r}: {first} and {where}")
    seen[key] = (first, count + 1)


# --------------------------------------------------------------------------- SFT data


def encode_sft_row(tokenizer, messages: list[dict], max_seq_len: int, where: str,
                   enable_thinking: bool | None = None, finished: bool = True) -> Seq:
    """Chat-template a conversation; targets = its last assistant turn, through the end-of-turn
    token when the answer ``finished`` (:func:`lopd.data.chat.sft_target`: the ``{% generation %}``
    markers when the template has them, else the tokens after the prompt's rendering); nothing
    after the target is kept. Longer than ``max_seq_len``: truncated."""
    if not messages or not any(msg.get("role") == "assistant" for msg in messages):
        raise TrainDataError(f"{where}: column messages: no assistant turn")
    try:
        ids, start, end = sft_target(tokenizer, messages, enable_thinking, finished)
    except ChatFormatError as e:
        raise TrainDataError(f"{where}: column messages: {e}") from None
    tokens = np.asarray(ids[:end], np.int64)[:max_seq_len]
    mask = np.zeros(end, bool)
    mask[start:end] = True
    mask = mask[:max_seq_len]
    mask[0] = False
    if not mask.any():
        raise TrainDataError(f"{where}: column messages: no assistant tokens within max_seq_len={max_seq_len}")
    return Seq(tokens, mask)


def samples_per_prompt(m: Manifest) -> int:
    """Rows each prompt may have in SFT data: ``samples / (prompts - skipped_too_long)`` from the
    sft-data manifest's metrics when that divides exactly (teacher sampling ``n`` > 1), else 1."""
    mt = m.metrics
    answered = mt.get("prompts", 0) - mt.get("skipped_too_long", 0)
    samples = mt.get("samples", 0)
    if isinstance(answered, int) and isinstance(samples, int) and answered > 0 and samples % answered == 0:
        return max(1, samples // answered)
    return 1


def load_sft_seqs(store: Store, prefix: str, tokenizer, max_seq_len: int, truncated: str = "drop"
                  ) -> tuple[list[Seq], Manifest, str, dict[str, int]]:
    """Read the sft-data stage (via its manifest) into tokenised sequences, sorted by prompt id.

    Prompts are rendered with the ``enable_thinking`` the teacher was sampled with (the manifest's
    lineage). Answers that stopped on the length limit (``finish_reason`` ``length``) are dropped
    (``truncated="drop"``) or trained on without an end-of-turn target (``"mask"``); the counts
    are returned as ``{"truncated_dropped": …, "truncated_masked": …}``. Each file is verified
    against the manifest before use; an empty dataset and a prompt id with more rows than the
    teacher sampled per prompt (:func:`samples_per_prompt`) are refused."""
    try:
        m, sha = read_manifest(store, prefix)
    except ManifestError as e:
        raise TrainDataError(f"SFT data: {e}") from None
    if not data_files(m):
        raise TrainDataError(f"{store.url(prefix)}: the SFT data manifest lists no parquet files")
    thinking = m.lineage.get("enable_thinking")
    rows = []
    counts = {"truncated_dropped": 0, "truncated_masked": 0}
    seen: dict[str, tuple[str, int]] = {}
    per_prompt = samples_per_prompt(m)
    for where, row0, batch in _batches(store, prefix, m, SFT_DATA, ["prompt_id", "messages", "finish_reason"]):
        for i, (pid, msgs, fin) in enumerate(zip(batch["prompt_id"], batch["messages"], batch["finish_reason"],
                                                 strict=True)):
            at = f"{where}: row {row0 + i}"
            _unique(seen, str(pid), at, "prompt_id", per_prompt)
            if fin not in ("stop", "length"):
                raise TrainDataError(f"{at} (prompt_id={pid!r}): column finish_reason: {fin!r} (stop or length)")
            if fin == "length":
                counts["truncated_masked" if truncated == "mask" else "truncated_dropped"] += 1
                if truncated != "mask":
                    continue
            rows.append((str(pid), encode_sft_row(tokenizer, msgs or [], max_seq_len, f"{at} (prompt_id={pid!r})",
                                                  thinking, finished=fin == "stop")))
    if not seen:
        raise TrainDataError(f"{store.url(prefix)}: the published SFT data holds no rows")
    if not rows:
        raise TrainDataError(f"{store.url(prefix)}: no usable rows (all {counts['truncated_dropped']} stopped on "
                             "the length limit; sft.truncated: mask trains on them)")
    rows.sort(key=lambda r: r[0])
    return [s for _, s in rows], m, sha, counts


# --------------------------------------------------------------------------- batches


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

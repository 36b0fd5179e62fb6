"""SFT training inputs: the sft-data parquet read via its manifest, chat-templated into
:class:`~lopd.train.packing.Seq` rows whose targets are the last assistant turn.

Verified and validated like every training input (:mod:`lopd.train.data`): a bad row is a
:class:`~lopd.train.data.TrainDataError` naming the file, the row and the column; a prompt id
repeated more often than the teacher's ``n`` names both rows.
"""

from __future__ import annotations

import numpy as np

from lopd.data.chat import ChatFormatError, sft_target
from lopd.data.schemas import SFT_DATA
from lopd.manifest import Manifest, ManifestError, read_manifest
from lopd.store import Store
from lopd.train.data import TrainDataError, check_unique, data_files, record_batches
from lopd.train.packing import Seq


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
    for where, row0, batch in record_batches(store, prefix, m, SFT_DATA, ["prompt_id", "messages", "finish_reason"]):
        for i, (pid, msgs, fin) in enumerate(zip(batch["prompt_id"], batch["messages"], batch["finish_reason"],
                                                 strict=True)):
            at = f"{where}: row {row0 + i}"
            check_unique(seen, str(pid), at, "prompt_id", per_prompt)
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

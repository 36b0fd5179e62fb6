"""Models as stages use them: a reference (published artifact, local directory or hub id)
made local and fingerprinted, with the lineage its manifest carries.

:func:`resolve_model` is what every stage calls for its teacher, student or checkpoints
(``StageContext.resolve_model`` in :mod:`lopd.stage`); errors name the recipe field.
Every resolved directory is checked to be complete before anything loads it
(:func:`check_model_dir`): a config, a tokenizer, and weight files that are whole.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd import LopdError
from lopd.fingerprint import (
    FINGERPRINT_FILES,
    HUB_ID_RE,
    WEIGHT_PATTERNS,
    fingerprint_hub,
    fingerprint_local,
    fingerprint_manifest,
    hash_local,
    remember_hashes,
)
from lopd.layout import MANIFEST
from lopd.manifest import InputRef, Manifest, ManifestError, fetch, read_manifest
from lopd.recipe import ModelSpec
from lopd.store import algorithm_of, cache_dir, is_store_uri, open_store


class ModelNotFoundError(LopdError):
    """A model reference that is neither a published artifact, a directory nor a hub id."""


class IncompleteModelError(LopdError):
    """A model directory that lacks a file transformers or vLLM needs, or has a damaged one."""


TOKENIZER_VOCABS = ("vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "*.tiktoken", "tiktoken.model")
MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_problem(p: Path) -> str | None:
    """Why a safetensors file is not whole (None when it is), from its header alone: the 8-byte
    little-endian header length, the JSON header, and the end of the last tensor's data, which
    must be the end of the file."""
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            if size < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable safetensors header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "safetensors header has a tensor without data_offsets"
    if 8 + n + end != size:
        return f"truncated or padded: header says {8 + n + end} bytes, file has {size}"
    return None


def check_model_dir(path: Path, field_name: str, ref: str) -> None:
    """Refuse (:class:`IncompleteModelError`, naming ``field_name`` and the file) a model directory
    without ``config.json``, without a tokenizer (``tokenizer.json``, or ``tokenizer_config.json``
    with a vocabulary file), without weight files, with a safetensors index naming a missing
    shard, or with a safetensors file whose header does not parse or whose size differs from
    what its header says. Reads headers only (no tensors)."""
    def bad(what: str) -> IncompleteModelError:
        return IncompleteModelError(f"{field_name}: model {ref!r} is incomplete: {what}")

    if not (path / "config.json").is_file():
        raise bad(f"{path / 'config.json'} is missing")
    names = [p.name for p in path.iterdir() if p.is_file()]
    has_vocab = any(fnmatch.fnmatch(n, v) for n in names for v in TOKENIZER_VOCABS)
    if "tokenizer.json" not in names and not ("tokenizer_config.json" in names and has_vocab):
        raise bad(f"no tokenizer in {path} (tokenizer.json, or tokenizer_config.json with a vocabulary file)")
    weights = sorted(n for n in names if any(fnmatch.fnmatch(n, w) for w in WEIGHT_PATTERNS))
    if not weights:
        raise bad(f"no weight files in {path} (*.safetensors, *.bin, ...)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad(f"{index} is not a safetensors index (no weight_map)") from None
        for shard in sorted(shards - set(names)):
            raise bad(f"{path / shard} is missing (listed in {index.name})")
    for n in weights:
        if n.endswith(".safetensors") and (why := safetensors_problem(path / n)):
            raise bad(f"{path / n}: {why}")


def check_against_manifest(path: Path, m: Manifest, field_name: str, ref: str) -> None:
    """Refuse a directory whose config or weight files differ from what its MANIFEST.json lists
    (its lineage would vouch for other weights); hashes come from the stat cache when the files
    are unchanged (:func:`lopd.fingerprint.hash_local`)."""
    listed = {f.path: f for f in m.files
              if f.path in FINGERPRINT_FILES or any(fnmatch.fnmatch(f.path, w) for w in WEIGHT_PATTERNS)}
    got = hash_local(path, sorted(listed), algorithms={rel: algorithm_of(f.digest) for rel, f in listed.items()})
    for rel, want in sorted(listed.items()):
        have = got.get(rel)
        if have is None or (have.bytes, have.digest) != (want.bytes, want.digest):
            why = "is missing" if have is None else "differs from its MANIFEST.json"
            raise IncompleteModelError(f"{field_name}: {path / rel} {why}: the manifest's lineage does not "
                                       f"describe these weights (lopd verify {path} lists every difference)")


@dataclass
class ResolvedModel:
    """A model made local: ``path`` is an HF directory that transformers and vLLM load."""

    ref: str
    path: Path
    fingerprint: str
    manifest: Manifest | None = None
    manifest_sha256: str | None = None

    @property
    def lineage(self) -> dict[str, Any]:
        """The model's own manifest lineage (empty for a bare directory or hub id)."""
        return dict(self.manifest.lineage) if self.manifest else {}

    def input_ref(self) -> InputRef:
        return InputRef(uri=self.ref, manifest_sha256=self.manifest_sha256)


def resolve_model(ref: str | ModelSpec, field_name: str = "model") -> ResolvedModel:
    """Make a model local and fingerprint it.

    - ``s3://…`` of a published artifact: its manifest is read, its files are fetched
      (verified, via the digest-keyed cache) into ``$LOPD_CACHE/models/<sha>``;
    - a local directory (a path or ``file://…``) with ``config.json``: used in place,
      fingerprinted from its files' content; when it carries a MANIFEST.json, its config and
      weight files must match it, and its lineage (e.g. an SFT checkpoint's teacher) is carried along;
    - a hub id ``org/name``: ``huggingface_hub.snapshot_download`` at the spec's revision.

    The directory must be complete (:func:`check_model_dir`). Errors name ``field_name``
    (e.g. ``models.teacher.uri``) and the reference or the bad file.
    """
    revision = None
    if isinstance(ref, ModelSpec):
        ref, revision = ref.uri, ref.revision
    if is_store_uri(ref) and not ref.startswith("file://"):  # a file:// artifact is read in place below
        store = open_store(ref)
        try:
            m, sha = read_manifest(store)
        except ManifestError as e:
            raise ModelNotFoundError(f"{field_name}: model {ref!r} not found ({e})") from None
        if not any(f.path == "config.json" for f in m.files):
            raise ModelNotFoundError(f"{field_name}: {ref!r} is an artifact but not a model (no config.json)")
        dest = fetch(store, "", cache_dir() / "models" / sha[:32], m)
        remember_hashes(dest, m.files)  # just verified against the manifest
        check_model_dir(dest, field_name, ref)
        return ResolvedModel(ref, dest, fingerprint_manifest(m), m, sha)
    path = Path(ref[7:] if ref.startswith("file://") else ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{field_name}: {ref!r} is a directory but not a model (no config.json)")
        m = sha = None
        if (path / MANIFEST).is_file():
            raw = (path / MANIFEST).read_bytes()
            try:
                m, sha = Manifest.model_validate_json(raw), hashlib.sha256(raw).hexdigest()
            except ValueError:
                m = sha = None
        check_model_dir(path, field_name, ref)
        if m is not None:
            check_against_manifest(path, m, field_name, ref)
        return ResolvedModel(ref, path, fingerprint_local(path), m, sha)
    if HUB_ID_RE.match(ref) and not path.exists() and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            fp, commit = fingerprint_hub(ref, revision)
            local = snapshot_download(ref, revision=commit)
        except LopdError as e:
            raise ModelNotFoundError(f"{field_name}: {e}") from None
        except Exception as e:  # hub errors: offline, gated, missing
            raise ModelNotFoundError(f"{field_name}: hub model {ref!r} unavailable ({str(e).splitlines()[0]})") \
                from None
        check_model_dir(Path(local), field_name, ref)
        return ResolvedModel(ref, Path(local), fp)
    raise ModelNotFoundError(f"{field_name}: model {ref!r} not found (not a published store URI, "
                             "a model directory, or a hub id)")

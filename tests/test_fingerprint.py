"""Model fingerprints (lopd.fingerprint): stable, location-independent and weight-sensitive, read
from a published model's manifest without a download, and a hub model's from the local cache; a
local directory's rests on its content (a hash is reused only under an unchanged stat signature)."""

from __future__ import annotations

import json

import pytest

from lopd.fingerprint import fingerprint, fingerprint_hub, fingerprint_local
from lopd.manifest import ManifestError, publish
from lopd.store import open_store
from tests.helpers.models import overwrite_in_place


def test_fingerprint_stable_and_sensitive(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    a = fingerprint_local(tiny_model, use_cache=False)
    b = fingerprint_local(tiny_model, use_cache=False)
    assert a == b == fingerprint_local(tiny_model) == fingerprint_local(tiny_model)  # hashed, then cached
    assert a == json.loads((tiny_model / "MANIFEST.json").read_text())["lineage"]["fingerprint"]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    (copy / "MANIFEST.json").unlink()
    assert fingerprint_local(copy) == a  # location-independent
    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_local(copy) != a


def test_fingerprint_of_published_model_needs_no_download(tiny_model, store_uri, monkeypatch):
    s = open_store(store_uri)
    publish(s, "models/teacher", tiny_model, stage="model", run_id="r")
    fp = fingerprint(s.url("models/teacher"))
    assert fp == fingerprint_local(tiny_model)


def test_fingerprint_hub_from_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--Qwen--Qwen3-8B" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    fp, commit = fingerprint_hub("Qwen/Qwen3-8B")
    assert commit == "a" * 40 and fingerprint("Qwen/Qwen3-8B") == fp
    assert fingerprint_hub("Qwen/Qwen3-8B", "b" * 40)[0] != fp
    with pytest.raises(ManifestError, match="not a store URI, an existing directory, or a hub id"):
        fingerprint("not a model")


def test_fingerprint_rests_on_content_not_manifest_or_size(tiny_model, tmp_path):
    """A weight file overwritten in place (same size, inode and mtime) changes the fingerprint,
    although the directory's MANIFEST.json still lists the old hash and a hash was cached."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    before = fingerprint_local(copy)  # hashes recorded in the stat cache
    assert before == json.loads((copy / "MANIFEST.json").read_text())["lineage"]["fingerprint"]
    overwrite_in_place(copy / "model.safetensors")
    after = fingerprint_local(copy)
    assert after != before and after == fingerprint_local(copy, use_cache=False)
    assert fingerprint(f"file://{copy}") == after


def test_verify_local_names_each_differing_file(tiny_model, tmp_path):
    import shutil

    from lopd.fingerprint import verify_local

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    assert verify_local(copy) == []
    overwrite_in_place(copy / "model.safetensors")
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    (copy / "tokenizer.json").unlink()
    (copy / "extra.bin").write_bytes(b"x")
    problems = verify_local(copy)
    assert [line.split(" (digest ")[0] for line in problems] == [
        f"config.json: {(tiny_model / 'config.json').stat().st_size + 1} bytes, manifest says "
        f"{(tiny_model / 'config.json').stat().st_size}",
        "model.safetensors: content differs from the manifest", "tokenizer.json: missing",
        "extra.bin: not listed in the manifest"]
    (copy / "MANIFEST.json").unlink()
    with pytest.raises(ManifestError, match="no manifest at"):
        verify_local(copy)


def test_a_model_whose_manifest_lists_sha256_still_verifies(tiny_model, tmp_path):
    """A model directory published by an older lopd (``"sha256": "<hex>"`` per file) is checked
    with sha256: ``lopd verify`` and :func:`resolve_model` accept it, and name a changed file."""
    import hashlib
    import shutil

    from lopd.fingerprint import verify_local
    from lopd.models import IncompleteModelError, resolve_model

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    m = json.loads((copy / "MANIFEST.json").read_text())
    m["files"] = [{"path": f["path"], "bytes": f["bytes"],
                   "sha256": hashlib.sha256((copy / f["path"]).read_bytes()).hexdigest()} for f in m["files"]]
    (copy / "MANIFEST.json").write_text(json.dumps(m))
    assert verify_local(copy) == []
    assert resolve_model(str(copy)).fingerprint == fingerprint_local(copy)
    overwrite_in_place(copy / "model.safetensors")
    [line] = verify_local(copy)
    assert line.startswith("model.safetensors: content differs from the manifest (digest sha256:")
    with pytest.raises(IncompleteModelError, match="model.safetensors differs from its MANIFEST.json"):
        resolve_model(str(copy))

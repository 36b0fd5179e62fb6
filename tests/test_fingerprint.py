"""Model fingerprints (lopd.fingerprint): stable, location-independent and weight-sensitive, read
from a published model's manifest without a download, and a hub model's from the local cache."""

from __future__ import annotations

import json

import pytest

from lopd.fingerprint import fingerprint, fingerprint_hub, fingerprint_local
from lopd.manifest import ManifestError, publish
from lopd.store import open_store


def test_fingerprint_stable_and_sensitive(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    a = fingerprint_local(tiny_model, use_manifest=False)
    b = fingerprint_local(tiny_model, use_manifest=False)
    assert a == b == fingerprint_local(tiny_model)  # cached in the model's manifest
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

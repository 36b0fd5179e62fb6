"""Model references (lopd.models): a published model, a local directory or a hub id made local and
fingerprinted, with the lineage its manifest carries; errors name the recipe field."""

from __future__ import annotations

import pytest

from lopd.fingerprint import fingerprint_local
from lopd.manifest import publish
from lopd.models import ModelNotFoundError, resolve_model


def test_resolve_model_from_store_dir_and_errors(store_uri, tiny_model, tmp_path):
    from lopd.store import open_store

    local = resolve_model(str(tiny_model), "models.teacher.uri")
    assert local.path == tiny_model and local.fingerprint == fingerprint_local(tiny_model)
    store = open_store(store_uri)
    publish(store, "models/t", tiny_model, stage="model", run_id="x", lineage={"teacher_fingerprint": "abc"})
    remote = resolve_model(store.url("models/t"), "precompute.student")
    assert remote.fingerprint == local.fingerprint and remote.lineage["teacher_fingerprint"] == "abc"
    assert (remote.path / "config.json").is_file() and remote.manifest_sha256
    with pytest.raises(ModelNotFoundError, match=r"^precompute.student: model .*nope.* not found"):
        resolve_model(store.url("models/nope"), "precompute.student")
    with pytest.raises(ModelNotFoundError, match=r"^models.teacher.uri: model '/no/such/dir' not found"):
        resolve_model("/no/such/dir", "models.teacher.uri")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve_model(str(tmp_path), "models.teacher.uri")
    with pytest.raises(ModelNotFoundError, match="models.student.uri: .*org/missing"):  # offline hub
        resolve_model("org/missing", "models.student.uri")

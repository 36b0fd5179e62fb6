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


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    (dst / "MANIFEST.json").unlink()
    return dst


def test_resolve_model_refuses_a_directory_without_tokenizer(tiny_model, tmp_path):
    from lopd.models import IncompleteModelError

    model = _copy(tiny_model, tmp_path / "m")
    (model / "tokenizer.json").unlink()
    with pytest.raises(IncompleteModelError, match=r"^models.teacher.uri: model .* is incomplete: no tokenizer"):
        resolve_model(str(model), "models.teacher.uri")
    (model / "vocab.json").write_text("{}")  # tokenizer_config.json + a vocabulary is a tokenizer
    assert resolve_model(str(model), "models.teacher.uri").path == model


@pytest.mark.parametrize("damage", ["truncate", "pad", "header"])
def test_resolve_model_refuses_a_damaged_safetensors_file(tiny_model, tmp_path, damage):
    from lopd.models import IncompleteModelError

    model = _copy(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[:-100], "pad": data + b"\0" * 8, "header": data[:8] + b"{nope" + data[13:]}
                        [damage])
    with pytest.raises(IncompleteModelError, match=r"^models.student.uri: .*model.safetensors: "
                       r"(truncated or padded|unreadable safetensors header)"):
        resolve_model(f"file://{model}", "models.student.uri")
    (model / "model.safetensors").unlink()
    with pytest.raises(IncompleteModelError, match="no weight files"):
        resolve_model(str(model), "models.student.uri")


def test_resolve_model_refuses_weights_that_differ_from_the_manifest(tiny_model, tmp_path):
    """A directory whose MANIFEST.json (and lineage) describes other weights of the same size."""
    import shutil

    from lopd.models import IncompleteModelError
    from tests.helpers.models import overwrite_in_place

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    before = resolve_model(str(model), "models.teacher.uri").fingerprint
    overwrite_in_place(model / "model.safetensors")
    with pytest.raises(IncompleteModelError, match=r"^models.teacher.uri: .*model.safetensors differs from its "
                       r"MANIFEST.json.*lopd verify"):
        resolve_model(str(model), "models.teacher.uri")
    (model / "MANIFEST.json").unlink()  # no manifest: a bare directory, fingerprinted from its content
    assert resolve_model(str(model), "models.teacher.uri").fingerprint != before


def test_stage_refuses_an_incomplete_model_with_one_error_line(tiny_model, tmp_path):
    """The sft entrypoint given a student without tokenizer: exit 2 and one ``error:`` line."""
    from tests.helpers.training import run_job, sft_recipe

    model = _copy(tiny_model, tmp_path / "student")
    (model / "tokenizer.json").unlink()
    recipe, _ = sft_recipe(tmp_path, model)
    res = run_job("jobs.sft", recipe, check=False)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert errors == [f"error: models.student.uri: model {str(model)!r} is incomplete: no tokenizer in {model} "
                      "(tokenizer.json, or tokenizer_config.json with a vocabulary file)"]

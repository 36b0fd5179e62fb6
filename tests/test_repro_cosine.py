"""lopd repro's offline-vs-online gradient cosine rows (:mod:`lopd.repro_cosine`): the derived runs,
the refusal of rows it cannot measure, the series and the PNG (the diagnostic itself is tested in
tests/test_train_opd.py)."""

from __future__ import annotations

import json

import pytest

from lopd.repro_results import ReproError
from tests.helpers.repro import study


def test_cosine_run_repeats_the_test_run_with_the_diagnostic_on(tmp_path):
    from lopd import repro_cosine
    from lopd.repro_select import candidates

    s = study(tmp_path, shared=False)
    assert repro_cosine.rows(s) == ["lightning", "lightning-is"]
    s.chosen = {n: candidates(s, n)[-1] for n in s.variants}
    r, _ = repro_cosine.recipe(s, "lightning-is", 0)
    test, _ = s.variant("lightning-is", 0)
    assert r.run_id.startswith("tiny-lightning-is-cos-") and r.run_id.endswith("-s0")
    assert r.opd.grad_discrepancy_every == s.cfg.grad_cosine.every and test.opd.grad_discrepancy_every == 0
    assert r.opd.model_copy(update={"grad_discrepancy_every": 0}) == test.opd  # the same updates otherwise


@pytest.mark.parametrize("row", ["online", "topk", "seqkd"])
def test_rows_that_do_not_train_on_shared_rollouts_are_refused(tmp_path, row):
    with pytest.raises(ReproError, match=f"'{row}' does not train offline on its seed's shared rollouts") as e:
        study(tmp_path, f"repro.grad_cosine.rows={{{row}}}", shared=False)
    assert "\n" not in str(e.value)


def test_series_and_png_from_the_logged_steps(tmp_path):
    from lopd import repro_cosine
    from lopd.layout import stage_prefix
    from lopd.manifest import publish
    from lopd.repro_plots import write_grad_cosine

    s = study(tmp_path / "store", "repro.selection=null", "repro.grad_cosine.rows={lightning}", shared=False)
    steps = [{"step": 1, "loss": 1.0, "grad_cosine": 0.5, "grad_norm_ratio": 1.2}, {"step": 2, "loss": 0.9},
             {"step": 3, "loss": 0.8, "grad_cosine": 0.25, "grad_norm_ratio": 1.1}]
    local = tmp_path / "opd"
    local.mkdir()
    (local / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in steps))
    rid = repro_cosine.run_id(s, "lightning", 0)
    publish(s.store, stage_prefix(rid, "opd"), local, stage="opd", run_id=rid)
    got = repro_cosine.series(s, 0)
    assert got == {"lightning": {"step": [1.0, 3.0], "grad_cosine": [0.5, 0.25], "grad_norm_ratio": [1.2, 1.1]}}
    png = write_grad_cosine(tmp_path, {"run_id": "tiny", "seeds": [0], "grad_cosine": got})
    assert png.stat().st_size > 1000 and write_grad_cosine(tmp_path, {"grad_cosine": None}) is None

"""``clip_saturated``: clipping on almost every step; a warning when it hides large norms."""

from __future__ import annotations

from ..series import batch, final, noisy


def test_norms_far_above_the_threshold_warn():
    (finding,) = final(batch(noisy(4.0, 150), threshold=1.0))
    assert finding.kind == "clip_saturated" and finding.severity == "warning"
    assert finding.evidence["clipped_share"] >= 0.9 and finding.evidence["median_ratio"] > 3
    assert any("learning rate" in a for a in finding.advice)


def test_a_threshold_just_under_the_typical_norm_is_information():
    found = final(batch(noisy(1.4, 150, spread=0.05), threshold=1.0))
    assert [f.severity.value for f in found if f.kind == "clip_saturated"] == ["info"]


def test_an_adaptive_clipper_clipping_every_step_is_information():
    import numpy as np

    norms = np.geomspace(0.5, 5.0, 200)  # a rising norm an EMA threshold lags behind
    found = final(batch(norms.tolist(), threshold=(norms / 3).tolist()))
    assert [f.severity.value for f in found if f.kind == "clip_saturated"] == ["info"]


def test_clipping_a_model_that_fits_its_data_is_not_reported():
    norms = noisy(1e-8, 150)  # what is clipped moves nothing: the loss is 1e-6 of its start
    losses = [1.0] * 10 + [1e-6] * 140
    found = final(batch(norms, threshold=1e-9, loss=losses))
    assert [f for f in found if f.kind == "clip_saturated"] == []
    high = [1.0] * 150  # the same clipping while the loss is still high is
    found = final(batch(norms, threshold=1e-9, loss=high))
    assert [f.kind for f in found if f.kind == "clip_saturated"] == ["clip_saturated"]

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

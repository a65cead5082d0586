"""``clip_inactive``: a fixed threshold far above the norms (information)."""

from __future__ import annotations

import numpy as np

from ..series import batch, final, noisy


def test_a_threshold_far_above_the_norms_never_acts():
    (finding,) = final(batch(noisy(0.5, 150), threshold=10.0))
    assert finding.kind == "clip_inactive" and finding.severity == "info"
    assert finding.steps[0] == 0 and finding.evidence["idle_share"] >= 0.9
    assert 0.5 < finding.evidence["recommended_threshold"] < 1.0
    assert final(batch(noisy(0.5, 150), threshold=1.0)) == []


def test_an_adaptive_threshold_is_never_called_inactive():
    norms = np.geomspace(0.5, 0.005, 300)  # norms shrink; the clipper's threshold lags
    adaptive = (norms * 5.0).tolist()
    assert final(batch(norms.tolist(), threshold=adaptive)) == []

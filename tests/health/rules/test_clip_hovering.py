"""``clip_hovering``: norms pinned at a fixed threshold while clipping acts (information)."""

from __future__ import annotations

import numpy as np

from ..series import batch, final, noisy


def test_norms_at_a_fixed_threshold_with_clipping_acting_hover():
    (finding,) = final(batch(noisy(1.0, 150, spread=0.08), threshold=1.0))
    assert finding.kind == "clip_hovering" and finding.severity == "info"
    assert finding.evidence["clipped_share"] >= 0.25


def test_an_adaptive_clipper_with_nothing_clipped_never_hovers():
    # ZClip-like: the threshold follows the norm at ~1.2× it; nothing is clipped
    norms = np.array(noisy(0.5, 300, spread=0.05))
    found = final(batch(norms.tolist(), threshold=(norms * 1.2).tolist(), clipped=[0.0] * 300))
    assert found == []

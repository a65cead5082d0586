"""``vanishing``: the total norm stays near zero."""

from __future__ import annotations

from ..series import batch, final, kinds, noisy


def test_sustained_tiny_norms_vanish_with_their_range():
    norms = noisy(0.5, 50) + noisy(1e-8, 100, seed=1) + noisy(0.5, 150, seed=2)
    (finding,) = final(batch(norms), every=25)
    assert finding.kind == "vanishing" and finding.steps == (50, 149) and not finding.open
    assert finding.evidence["steps_below"] == 100


def test_small_but_healthy_norms_do_not():
    assert kinds(final(batch(noisy(1e-5, 50)))) == []

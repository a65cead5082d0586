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


def test_a_model_that_fits_its_data_is_not_vanishing():
    norms = noisy(0.5, 50) + noisy(1e-8, 150, seed=1)
    fitted = [1.0] * 50 + [1e-5] * 150  # the loss down to 1e-5 of where it began
    assert kinds(final(batch(norms, loss=fitted), every=25)) == []
    stuck = [1.0] * 50 + [0.9] * 150  # the same norms with the loss still high: vanishing
    assert kinds(final(batch(norms, loss=stuck), every=25)) == ["vanishing"]

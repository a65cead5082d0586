"""``spike``: one or two outlier steps, each its own short episode."""

from __future__ import annotations

from ..series import batch, final, kinds, noisy


def test_each_short_outlier_is_one_spike_with_its_step():
    norms = noisy(0.5, 200)
    norms[60] = 500.0
    norms[150] = 400.0
    found = final(batch(norms), every=20)
    assert kinds(found) == ["spike", "spike"]
    assert [f.steps for f in found] == [(60, 60), (150, 150)]
    assert all(f.severity == "info" and not f.open for f in found)
    assert found[0].evidence["peak_ratio"] > 500


def test_ordinary_noise_is_not_a_spike():
    norms = noisy(0.5, 100)
    norms[50] = 2.0  # 4× the median
    assert final(batch(norms)) == []


def test_heavy_tailed_norms_need_a_larger_outlier():
    norms = noisy(0.5, 200, spread=0.8)  # a converged, noisy run: 10× swings are common
    assert final(batch(norms)) == []


def test_three_outliers_in_a_row_are_exploding_not_a_spike():
    norms = noisy(0.5, 60) + [50.0] * 3 + noisy(0.5, 60, seed=1)
    assert kinds(final(batch(norms))) == ["exploding"]


def test_a_20x_swing_of_a_converged_run_is_no_spike():
    norms = noisy(0.05, 200, spread=0.3)
    norms[120] = 20 * 0.05  # one hard example: ten to twenty times is natural here
    assert final(batch(norms)) == []


def fitted_run(n=400, hard_at=300, hard_norm=0.6, hard_loss=0.03):
    """A classifier that fits its data: the loss falls from 2.3 to 1e-4, the norms from
    0.5 to 0.005, and one batch of hard examples gives a norm the run started with."""
    norms = noisy(0.5, 100) + noisy(0.005, n - 100, seed=1)
    losses = [2.3] * 50 + [0.5] * 50 + [1e-4] * (n - 100)
    norms[hard_at], losses[hard_at] = hard_norm, hard_loss
    return norms, losses


def test_a_fitted_models_hard_batch_is_no_spike():
    norms, losses = fitted_run()
    assert kinds(final(batch(norms, loss=losses), every=50)) == []
    # without a recorded loss, its norm (no larger than the first) is the evidence
    norms, _ = fitted_run(hard_norm=0.4)
    assert kinds(final(batch(norms), every=50)) == []


def test_a_bad_batch_in_a_fitted_run_is_still_a_spike():
    # its loss above the run's initial loss: a corrupt batch, whatever its norm
    norms, losses = fitted_run(hard_loss=50.0)
    assert kinds(final(batch(norms, loss=losses), every=50)) == ["spike"]
    # or its norm far above the scale training started at
    norms, losses = fitted_run(hard_norm=20.0)
    assert kinds(final(batch(norms, loss=losses), every=50)) == ["spike"]

"""``run_lost``: the verdict, for non-finite weights or a loss that never came back."""

from __future__ import annotations

import numpy as np

from ..series import NAN, NONFINITE, batch, final, kinds, noisy


def test_a_nonfinite_update_that_was_not_skipped_loses_the_run_from_that_step():
    norms, loss = noisy(0.5, 300), noisy(2.0, 300)
    norms[120:], loss[120:] = [NAN] * 180, [NAN] * 180
    lost = [f for f in final(batch(norms, loss=loss), every=50) if f.kind == "run_lost"]
    assert len(lost) == 1
    assert lost[0].steps == (120, 299) and lost[0].open
    assert lost[0].severity == "critical" and "step 120" in lost[0].message


def test_skipped_nonfinite_steps_keep_the_weights_and_the_run():
    norms, loss = noisy(0.5, 300), noisy(2.0, 300)
    norms[120:160], loss[120:160] = [NAN] * 40, [NAN] * 40
    skipped = [1.0 if 120 <= i < 160 else 0.0 for i in range(300)]
    reason = [NONFINITE * s for s in skipped]
    found = final(batch(norms, loss=loss, skipped=skipped, reason=reason))
    assert kinds(found) == ["nonfinite"]


def test_a_loss_that_diverged_above_its_start_and_stayed_loses_the_run():
    loss = np.r_[np.linspace(2.3, 0.2, 150), np.full(150, 5.0)] * np.exp(
        np.random.default_rng(0).normal(0, 0.05, 300)
    )
    lost = [f for f in final(batch(noisy(0.5, 300), loss=loss)) if f.kind == "run_lost"]
    assert len(lost) == 1
    first, last = lost[0].steps
    assert 150 <= first <= 156 and last == 299
    assert lost[0].evidence["loss_now"] > lost[0].evidence["loss_initial"]


def test_a_loss_that_came_back_is_not_lost():
    loss = np.r_[np.linspace(2.3, 0.2, 150), np.full(30, 5.0), np.full(120, 0.2)]
    found = final(batch(noisy(0.5, 300), loss=loss))
    assert "run_lost" not in kinds(found)
    assert "loss_divergence" in kinds(found)


def test_a_flat_loss_whose_batches_spread_over_decades_is_not_lost():
    # a fine-tuned classifier's batch losses (log-normal, sigma 1.2) stay put: twice the
    # running minimum of their noisy median, held 50 steps, is noise, not a lost run
    for seed in range(5):
        loss = 0.02 * np.exp(np.random.default_rng(seed).normal(0, 1.2, 400))
        assert "run_lost" not in kinds(final(batch(noisy(0.5, 400), loss=loss)))

"""``loss_divergence``: the loss rises far above its best (never called a stall)."""

from __future__ import annotations

import numpy as np

from ..series import batch, final, kinds, noisy


def test_a_loss_that_explodes_diverges_and_does_not_stall():
    loss = np.r_[np.linspace(1.0, 0.08, 200), np.geomspace(0.08, 6.7e5, 200)]
    found = final(batch(noisy(0.5, 400), loss=loss))
    assert "loss_divergence" in kinds(found) and "loss_stall" not in kinds(found)
    (finding,) = [f for f in found if f.kind == "loss_divergence"]
    assert finding.steps[1] == 399 and finding.evidence["loss_peak"] > 1e5


def test_the_start_level_is_the_first_loss_unless_it_looks_like_a_lucky_batch():
    # the loss doubles from its first value, then climbs further: judged from 3.0
    draw = np.random.default_rng(0)
    rising = [3.0, *list(draw.uniform(5.5, 7.0, 30)), *list(draw.uniform(7.5, 9.0, 170))]
    (finding,) = [
        f for f in final(batch(noisy(0.5, 201), loss=rising)) if f.kind == "loss_divergence"
    ]
    assert finding.steps[0] <= 40 and finding.evidence["loss_best"] == 3.0
    # a first loss under half the next ones may be a lucky batch: the median is the start
    lucky = [2.0, *list(np.random.default_rng(0).uniform(5.5, 7.0, 200))]
    assert "loss_divergence" not in kinds(final(batch(noisy(0.5, 201), loss=lucky)))


def test_a_flat_loss_whose_batches_spread_over_decades_does_not_diverge():
    # a fine-tuned classifier: most batches easy, a few hard (log-normal, sigma 1.2); the
    # running minimum of a noisy median is an extreme, and twice it is within the noise
    for seed in range(5):
        loss = 0.02 * np.exp(np.random.default_rng(seed).normal(0, 1.2, 400))
        assert "loss_divergence" not in kinds(final(batch(noisy(0.5, 400), loss=loss)))
    # the same noise after a rise of x100 is a divergence
    loss = 0.02 * np.exp(np.random.default_rng(9).normal(0, 1.2, 400))
    loss[200:] *= 100.0
    (finding,) = [
        f for f in final(batch(noisy(0.5, 400), loss=loss)) if f.kind == "loss_divergence"
    ]
    assert 200 <= finding.steps[0] <= 215


def test_noise_around_a_converged_loss_does_not_diverge():
    rng = np.random.default_rng(1)
    loss = np.r_[np.linspace(2.3, 0.05, 100), 0.05 * np.exp(rng.normal(0, 0.6, 300))]
    assert final(batch(noisy(0.5, 400), loss=loss)) == []

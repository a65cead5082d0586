"""``loss_stall``: a run that has not learned (never a rising loss)."""

from __future__ import annotations

import numpy as np

from ..series import batch, final, kinds, noisy


def test_a_loss_stuck_at_its_start_is_not_learning_since_the_first_step():
    rng = np.random.default_rng(0)
    flat = 2.3 + 0.02 * rng.normal(size=300)
    (finding,) = final(batch(noisy(0.4, 300), loss=flat))
    assert finding.kind == "loss_stall" and finding.steps == (0, 299) and finding.open
    assert abs(finding.evidence["improvement"]) < 0.05
    assert "not improving" in finding.message


def test_a_loss_that_never_fell_and_ends_higher_is_called_worse_not_flat():
    rng = np.random.default_rng(0)
    rising = np.linspace(2.3, 3.7, 300) + 0.02 * rng.normal(size=300)  # ×1.6: no divergence
    (finding,) = final(batch(noisy(0.4, 300), loss=rising))
    assert finding.kind == "loss_stall" and finding.evidence["improvement"] < -0.5
    assert "worse than at the start" in finding.message and "higher" in finding.message
    assert "not improving" not in finding.message


def test_a_learning_run_and_a_converged_run_are_not_stalled():
    assert final(batch(noisy(0.4, 300), loss=np.linspace(2.3, 1.5, 300))) == []
    converged = np.r_[np.linspace(2.3, 0.1, 100), np.full(200, 0.1)]
    assert final(batch(noisy(0.4, 300), loss=converged)) == []


def test_a_loss_that_fell_and_came_back_diverged_rather_than_stalled():
    loss = np.r_[np.linspace(2.3, 0.2, 100), np.full(250, 2.3)]
    assert "loss_stall" not in kinds(final(batch(noisy(0.4, 350), loss=loss)))


def test_a_resumed_run_is_not_judged_against_its_first_loss():
    rng = np.random.default_rng(0)
    flat = 0.3 + 0.01 * rng.normal(size=300)  # a converged model, resumed at step 5000
    assert final(batch(noisy(0.4, 300), loss=flat, start=5000)) == []

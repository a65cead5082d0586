"""``lr_change``: a learning-rate rise tied to the harm that followed it."""

from __future__ import annotations

import numpy as np

from ..series import batch, final, kinds, noisy


def _run(lr, norms, loss):
    return [f for f in final(batch(norms, lr=lr, loss=loss), every=25) if f.kind == "lr_change"]


def test_a_jump_followed_by_exploding_norms_is_named_with_both_factors():
    lr = [1e-3] * 250 + [5.0] * 150
    norms = noisy(0.3, 250) + noisy(9e4, 150, seed=1)
    loss = np.r_[np.linspace(2.3, 0.1, 250), np.full(150, 6e5)]
    (finding,) = _run(lr, norms, loss)
    assert finding.steps == (250, 399) and finding.open
    assert finding.message.startswith("learning rate raised 5e+03× at step 250 (0.001 → 5)")
    assert finding.evidence["norm_peak"] / finding.evidence["norm_before"] > 1e5
    assert "; gradient norm ×" in finding.message and "since" in finding.message
    assert finding.evidence["lr_ratio"] == 5000 and finding.origin == "lr"


def test_a_jump_that_only_hurts_the_loss_is_named_too():
    lr = [3e-3] * 120 + [0.9] * 180
    loss = np.r_[np.linspace(2.3, 1.0, 120), np.full(180, 4.0)]
    (finding,) = _run(lr, noisy(1.0, 300), loss)
    assert finding.steps[0] == 120 and finding.steps[1] == 299
    assert finding.message.endswith("; loss 1.033 → 4")


def test_warmup_and_decay_without_harm_say_nothing():
    lr = np.r_[np.linspace(1e-5, 1e-3, 30), np.geomspace(1e-3, 1e-5, 270)]
    assert _run(lr, noisy(0.5, 300), np.linspace(5.0, 2.0, 300)) == []


def test_a_warm_restart_back_to_an_lr_already_used_is_the_schedules():
    # SGDR: cosine cycles of 100 steps from 0.05 to ~0, each restart raising the loss for
    # a while (the catapult it is meant to give); then a jump above every LR used, harmful
    cycle = list(1e-5 + 0.5 * 0.05 * (1 + np.cos(np.pi * np.arange(100) / 100)))
    lr = cycle * 3 + [0.5] * 100
    loss = np.r_[np.tile(np.r_[np.full(10, 3.0), np.linspace(1.0, 0.3, 90)], 3), np.full(100, 6.0)]
    (finding,) = _run(lr, noisy(0.5, 400), loss)
    assert finding.steps[0] == 300


def test_harm_long_after_the_rise_is_not_blamed_on_it():
    lr = [1e-3] * 50 + [5e-3] * 350  # a 5× step at 50, harmless
    norms = noisy(0.5, 300) + noisy(50.0, 100, seed=1)  # explodes 250 steps later
    assert _run(lr, norms, np.linspace(2.0, 1.0, 400)) == []
    assert "exploding" in kinds(final(batch(norms, lr=lr)))


def test_norms_that_grow_during_a_warmup_while_the_loss_falls_are_no_harm():
    lr = np.r_[np.linspace(1e-3, 5e-2, 60), np.full(240, 5e-2)]
    norms = np.r_[np.geomspace(0.3, 10.0, 60), np.full(240, 3.0)].tolist()
    assert _run(lr, norms, np.linspace(2.3, 0.1, 300)) == []

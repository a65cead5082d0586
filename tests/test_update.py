"""A skipped step changes nothing, for every torch optimizer: each faulted run against a
twin that never saw the faults, parameters and optimizer state bit for bit, on the first
step and later ones, with and without AMP, on the host-math and the device-math path."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import gradguard as gg
from benchmarks.faults import OPTIMIZERS, Trial, run, run_trial
from gradguard import _update


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # each trial warns on its first skip
        yield


@pytest.mark.parametrize("host_math", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_skipped_steps_leave_everything_as_the_twin_that_never_saw_them(optimizer, amp, host_math):
    # A fault on the first step (before the optimizer has state) and on a later one.
    faults = {0: (0, float("nan")), 2: (1, float("inf"))}
    outcome = run_trial(Trial(optimizer, "mlp", amp, host_math, 4, faults))
    assert outcome.injections == 2
    assert outcome.reported == 2 and outcome.named == 2
    assert outcome.param_mismatches == 0
    assert outcome.state_mismatches == 0


def test_random_fault_injection_finds_no_difference():
    """A few hundred random injections (benchmarks/faults.py runs ten thousand)."""
    results = run(200, seed=random.Random().randrange(1000))
    assert sum(r.injections for r in results.values()) >= 200
    for name, r in results.items():
        assert r.reported == r.injections == r.named, name
        assert r.param_mismatches == r.state_mismatches == 0, name


def test_folding_a_first_step_skip_would_corrupt_fused_state(monkeypatch):
    """Why the guard does not fold a skip before the state exists: torch's fused SGD
    allocates its momentum with ``empty_like`` and fused Adam creates zero moments before
    honouring ``found_inf``. Folding anyway must show up as a difference."""
    monkeypatch.setattr(_update, "state_ready", lambda optimizer, params: True)
    faults = {0: (0, float("nan"))}
    for name in ("SGD-momentum/fused", "Adam/fused"):
        outcome = run_trial(Trial(name, "mlp", False, False, 3, faults))
        assert outcome.state_mismatches > 0, name


def test_fused_skips_after_the_first_step_stay_on_the_device():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    params = list(model.parameters())
    assert not _update.state_ready(optimizer, params)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert _update.state_ready(optimizer, params)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # no momentum: no state
    assert _update.state_ready(plain, params)
    guard = gg.Guard(model, host_math=False)
    assert guard.step(optimizer) is not None


def test_a_cleared_state_is_not_folded_into_even_after_it_was_ready():
    """Readiness is remembered between steps (a loop over the parameters otherwise); an
    emptied state (``state.clear()``, or ``load_state_dict`` of a fresh optimizer) must be
    seen, or the fused step would create zero moments on a skipped step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, host_math=False, compile=False, health=False)
    for poison in (False, False, True):
        model(torch.randn(3, 4)).sum().backward()
        if poison:
            optimizer.state.clear()
            model.weight.grad[0, 0] = float("nan")
        result = guard.step(optimizer)
        optimizer.zero_grad()
    assert result.is_skipped()
    assert len(optimizer.state) == 0
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(3, 4)).sum().backward()
    guard.step(optimizer)  # ready again
    optimizer.zero_grad()
    optimizer.load_state_dict(fresh.state_dict())
    model(torch.randn(3, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    assert guard.step(optimizer).is_skipped()
    assert len(optimizer.state) == 0

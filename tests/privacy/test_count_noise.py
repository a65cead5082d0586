"""The clip count's noise sources: a seeded, checkpointable generator and the OS's CSPRNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.privacy.count_noise import SecureNormal, SeededNormal

CPU = torch.device("cpu")


def test_seeded_draws_repeat_with_the_seed_and_resume_from_a_state():
    a, b = SeededNormal(5), SeededNormal(5)
    first = [float(a.draw(CPU)) for _ in range(3)]
    assert first == [float(b.draw(CPU)) for _ in range(3)]
    state = a.state_dict()
    rest = [float(a.draw(CPU)) for _ in range(3)]
    resumed = SeededNormal(99)
    resumed.load_state_dict(state)
    assert [float(resumed.draw(CPU)) for _ in range(3)] == rest
    assert a.draw(CPU).dtype == torch.float64


def test_secure_draws_are_standard_normal_and_never_repeat():
    source = SecureNormal()
    draws = np.array([source.draw(CPU) for _ in range(20000)])
    assert abs(draws.mean()) < 4 / math.sqrt(20000)
    assert draws.std() == pytest.approx(1.0, rel=0.03)
    # the excess kurtosis of a normal is 0 (a sum of four uniforms would not be)
    kurtosis = ((draws - draws.mean()) ** 4).mean() / draws.var() ** 2 - 3
    assert abs(kurtosis) < 0.15
    other = np.array([SecureNormal().draw(CPU) for _ in range(100)])
    assert not np.array_equal(draws[:100], other)


def test_secure_state_has_nothing_to_restore_and_refuses_a_seeded_one():
    source = SecureNormal()
    source.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="secure_mode=True"):
        source.load_state_dict(SeededNormal(0).state_dict())
    with pytest.raises(ValueError, match="secure_mode"):
        SeededNormal(0).load_state_dict(source.state_dict())

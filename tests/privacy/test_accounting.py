"""The budget split between the clipped-gradient sum and the clip count (Theorem 1)."""

from __future__ import annotations

import math

import pytest

from gradguard.privacy import combined_noise_multiplier, gradient_noise_multiplier


def test_budget_split_follows_theorem_1():
    z, sigma_b = 1.1, 1.6
    sigma = gradient_noise_multiplier(z, sigma_b)
    assert sigma == pytest.approx((1.1**-2 - 3.2**-2) ** -0.5)
    assert sigma > z
    assert combined_noise_multiplier(sigma, sigma_b) == pytest.approx(z)
    assert combined_noise_multiplier(sigma, math.inf) == pytest.approx(sigma)
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0


def test_too_little_count_noise_is_refused_with_both_names():
    # opacus#757: sigma_b = expected_batch_size / 20 = 0.4 cannot carry z = 1.0
    with pytest.raises(ValueError, match=r"count_noise_std=0.4 .*noise_multiplier=1") as info:
        gradient_noise_multiplier(1.0, 0.4)
    assert "noise_multiplier / 2 = 0.5" in str(info.value)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1.0, 1.0), "noise_multiplier"),
        ((math.nan, 1.0), "noise_multiplier"),
        ((1.0, -1.0), "count_noise_std"),
        ((1.0, math.inf), "count_noise_std"),
    ],
)
def test_bad_arguments_are_named(args, name):
    with pytest.raises(ValueError, match=name):
        gradient_noise_multiplier(*args)


def test_combined_multiplier_refuses_bad_arguments():
    with pytest.raises(ValueError, match="gradient_multiplier"):
        combined_noise_multiplier(-1.0, 1.0)
    with pytest.raises(ValueError, match="count_noise_std"):
        combined_noise_multiplier(1.0, math.nan)

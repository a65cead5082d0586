"""Splitting one privacy budget between the clipped-gradient sum and the clip-count query.

Adaptive clipping (Andrew et al. 2021) releases two noisy sums per step: the sum of
clipped per-example gradients (sensitivity ``C``, noise ``sigma_grad * C``) and the sum
of the centred bits ``1[‖g_i‖ ≤ C] - 1/2`` (sensitivity 1/2, noise ``count_noise_std``).
By Theorem 1 of the paper the pair is exactly as private as one Gaussian mechanism with
noise multiplier ``z`` where ``z**-2 = sigma_grad**-2 + (2 * count_noise_std)**-2``, so
the usual accountant fed with ``z`` stays correct.
"""

from __future__ import annotations

import math

from .. import _validate as check


def gradient_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """The gradient noise multiplier that leaves the budget of ``noise_multiplier``.

    ``(z**-2 - (2 * count_noise_std)**-2) ** -0.5``; 0 when ``noise_multiplier`` is 0 (no
    privacy). Raises when ``count_noise_std <= noise_multiplier / 2``: the count alone
    would then spend the whole budget and no finite gradient noise is left.
    """
    z = check.non_negative("noise_multiplier", noise_multiplier)
    sigma_b = check.non_negative("count_noise_std", count_noise_std)
    if z == 0.0:
        return 0.0
    if sigma_b <= z / 2:
        raise ValueError(
            f"count_noise_std={sigma_b:g} is too small for noise_multiplier={z:g}: the noisy "
            f"clip count alone would spend the whole privacy budget. It must exceed "
            f"noise_multiplier / 2 = {z / 2:g} (Andrew et al. 2021, Theorem 1); the paper "
            "suggests expected_batch_size / 20, which small batches cannot meet: give a "
            "larger count_noise_std, a larger batch, or a smaller noise_multiplier"
        )
    return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5


def combined_noise_multiplier(gradient_multiplier: float, count_noise_std: float) -> float:
    """The single noise multiplier an accountant must use for the pair of releases.

    Inverse of :func:`gradient_noise_multiplier`; ``count_noise_std=inf`` (no count
    released) gives ``gradient_multiplier`` back.
    """
    sigma = check.non_negative("gradient_multiplier", gradient_multiplier)
    sigma_b = float(count_noise_std)
    if math.isnan(sigma_b) or sigma_b < 0:
        raise ValueError(f"count_noise_std must be >= 0, got {count_noise_std}")
    if sigma == 0.0 or sigma_b == 0.0:
        return 0.0
    return (sigma**-2 + (2.0 * sigma_b) ** -2) ** -0.5

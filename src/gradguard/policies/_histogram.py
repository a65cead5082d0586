"""Percentiles of an unbounded stream of positive numbers in constant time and memory.

Counts live in log-spaced bins on the device (1e-12 to 1e8, 4000 bins: 1.2% wide), so a
percentile costs one cumulative sum over the bins, whatever the number of values, and
needs no host sync. Within a bin the value is interpolated geometrically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOW, HIGH, BINS = -12.0, 8.0, 4000
WIDTH = (HIGH - LOW) / BINS


def empty(device: torch.device) -> Tensor:
    """Bin counts of no values."""
    return torch.zeros(BINS, dtype=torch.float64, device=device)


def add_(counts: Tensor, values: Tensor) -> Tensor:
    """Count ``values`` (1-D) into ``counts`` in place; NaN and inf are left out."""
    values = values.to(counts.device, torch.float64).reshape(-1)
    finite = torch.isfinite(values)
    safe = torch.where(finite, values, 1.0).clamp(min=1e-300)
    index = ((torch.log10(safe) - LOW) / WIDTH).floor().clamp(0, BINS - 1).long()
    return counts.index_add_(0, index, finite.double())


def quantile(counts: Tensor, q: float) -> Tensor:
    """The ``q``-quantile (0 ≤ q ≤ 1) of the counted values; NaN when there are none."""
    cumulative = counts.cumsum(0)
    total = cumulative[-1]
    target = (q * total).clamp(min=0.5).reshape(1)  # at least inside the first value's bin
    index = torch.searchsorted(cumulative, target).clamp(max=BINS - 1)[0]
    before = torch.where(index > 0, cumulative[(index - 1).clamp(min=0)], 0.0)
    inside = counts[index].clamp(min=1.0)
    fraction = ((target[0] - before) / inside).clamp(0.0, 1.0)
    exponent = LOW + (index.double() + fraction) * WIDTH
    value = torch.pow(10.0, exponent).float()
    return torch.where(total > 0, value, torch.full_like(value, math.nan))

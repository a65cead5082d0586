"""Percentiles of an unbounded stream of positive numbers in constant time and memory.

Counts live in log-spaced bins (1e-12 to 1e8, 4000 bins: 1.2% wide), so a percentile
costs one cumulative sum over the bins, whatever the number of values, and needs no
host sync. Within a bin the value is interpolated geometrically. Written with
:mod:`gradguard.ops`, like the policies that use it.
"""

from __future__ import annotations

import math

from ..ops import Array, Ops

LOW, HIGH, BINS = -12.0, 8.0, 4000
WIDTH = (HIGH - LOW) / BINS


def empty(xp: Ops, like: Array) -> Array:
    """Bin counts of no values."""
    return xp.full(BINS, 0.0, like, dtype="float64")


def add(xp: Ops, counts: Array, values: Array) -> Array:
    """``counts`` with ``values`` counted in (may write into ``counts``); NaN and inf are
    left out."""
    values = xp.ravel(xp.f64(values))
    finite = xp.isfinite(values)
    safe = xp.clip(xp.where(finite, values, 1.0), low=1e-300)
    index = xp.as_index(xp.clip(xp.floor((xp.log10(safe) - LOW) / WIDTH), 0.0, BINS - 1.0))
    return xp.add_at(counts, index, xp.f64(finite))


def quantile(xp: Ops, counts: Array, q: float) -> Array:
    """The ``q``-quantile (0 ≤ q ≤ 1) of the counted values, float32; NaN when there are none."""
    cumulative = xp.cumsum(counts)
    total = cumulative[-1]
    target = xp.maximum(q * total, 0.5)  # at least inside the first value's bin
    index = xp.minimum(xp.searchsorted(cumulative, target), BINS - 1)
    before = xp.where(index > 0, xp.take(cumulative, xp.maximum(index - 1, 0)), 0.0)
    inside = xp.maximum(xp.take(counts, index), 1.0)
    fraction = xp.clip((target - before) / inside, 0.0, 1.0)
    exponent = LOW + (xp.f64(index) + fraction) * WIDTH
    value = xp.f32(10.0**exponent)
    return xp.where(total > 0, value, math.nan)

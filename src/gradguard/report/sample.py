"""Bounded views of long series on one step grid: min/max per bucket, so no spike is lost.

Every chart of a report (and every run of a comparison) shares one :class:`Grid` of at
most ``BUCKETS`` step buckets, so the charts line up on one step axis and a zoom on one
applies to all. A run shorter than the grid gets one bucket per step (exact values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Default number of buckets a series is reduced to.
BUCKETS = 2000


def bucket_starts(n: int, buckets: int = BUCKETS) -> np.ndarray:
    """Start indices of at most ``buckets`` near-equal runs of ``n`` points."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, int(buckets)))
    return np.unique((np.arange(k, dtype=np.int64) * n) // k)


@dataclass(frozen=True)
class Grid:
    """Step buckets ``[start[i], end[i]]`` (inclusive) covering a step range."""

    start: np.ndarray
    end: np.ndarray

    @classmethod
    def over(cls, step_arrays: Sequence[np.ndarray], buckets: int = BUCKETS) -> Grid:
        """The grid spanning every step of ``step_arrays`` in at most ``buckets`` buckets."""
        filled = [np.asarray(s, dtype=np.int64) for s in step_arrays if np.size(s)]
        if not filled:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty)
        lo = min(int(s.min()) for s in filled)
        hi = max(int(s.max()) for s in filled)
        start = lo + bucket_starts(hi - lo + 1, buckets)
        return cls(start, np.append(start[1:] - 1, hi))

    def __len__(self) -> int:
        return int(self.start.size)

    def locate(self, steps: np.ndarray) -> np.ndarray:
        """The bucket of each step (steps must lie within the grid)."""
        return np.searchsorted(self.start, np.asarray(steps, dtype=np.int64), side="right") - 1


def _runs(grid: Grid, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For step-sorted points: the buckets they fill and where each bucket's run starts."""
    where = grid.locate(steps)
    if where.size and np.any(np.diff(where) < 0):
        raise ValueError("steps must be in increasing order")
    filled, first = np.unique(where, return_index=True)
    return filled, first


def reduce(grid: Grid, steps: np.ndarray, values: np.ndarray, how: str) -> np.ndarray:
    """Per bucket: ``min``, ``max``, ``mean`` or ``last`` of the finite values (NaN if none).

    ``count`` counts the points in each bucket, ``nonfinite`` the NaN/inf ones, ``sum``
    adds the values (for 0/1 flags).
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if steps.size != values.size:
        raise ValueError(f"steps has {steps.size} entries but values has {values.size}")
    out = np.full(len(grid), 0.0 if how in ("count", "nonfinite", "sum") else np.nan)
    if steps.size == 0 or len(grid) == 0:
        return out
    filled, first = _runs(grid, steps)
    finite = np.isfinite(values)
    if how == "count":
        out[filled] = np.diff(np.append(first, values.size))
        return out
    if how == "nonfinite":
        out[filled] = np.add.reduceat((~finite).astype(np.int64), first)
        return out
    if how == "sum":
        out[filled] = np.add.reduceat(np.where(finite, values, 0.0), first)
        return out
    count = np.add.reduceat(finite.astype(np.int64), first)
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "min":
            got = np.minimum.reduceat(np.where(finite, values, np.inf), first)
        elif how == "max":
            got = np.maximum.reduceat(np.where(finite, values, -np.inf), first)
        elif how == "mean":
            got = np.add.reduceat(np.where(finite, values, 0.0), first) / np.maximum(count, 1)
        elif how == "last":
            index = np.where(finite, np.arange(values.size), -1)
            last = np.maximum.reduceat(index, first)
            got = np.where(last >= 0, values[np.maximum(last, 0)], np.nan)
        else:
            raise ValueError(f"how must be min, max, mean, last, count, nonfinite or sum: {how!r}")
    out[filled] = np.where(count > 0, got, np.nan)
    return out


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return values
    window = max(1, int(window))
    csum = np.concatenate(([0.0], np.cumsum(values)))
    i = np.arange(1, values.size + 1)
    lo = np.maximum(0, i - window)
    return (csum[i] - csum[lo]) / (i - lo)


def reduce_max(values: np.ndarray, starts: np.ndarray, axis: int) -> np.ndarray:
    """Max over runs of ``values`` along ``axis`` starting at ``starts``; a non-finite
    entry makes its run inf."""
    bad = ~np.isfinite(values)
    clean = np.where(bad, -np.inf, values)
    out = np.maximum.reduceat(clean, starts, axis=axis)
    anybad = np.add.reduceat(bad.astype(np.int64), starts, axis=axis) > 0
    return np.where(anybad, np.inf, out)

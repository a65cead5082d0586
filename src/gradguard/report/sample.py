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


@dataclass(frozen=True)
class Bucketed:
    """Step-sorted points placed on a grid once, reduced per bucket many times."""

    size: int  # buckets in the grid
    points: int  # points placed
    filled: np.ndarray  # the buckets holding points
    first: np.ndarray  # index of each filled bucket's first point

    @classmethod
    def place(cls, grid: Grid, steps: np.ndarray) -> Bucketed:
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        if steps.size == 0 or len(grid) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(len(grid), 0, empty, empty)
        if steps[0] < grid.start[0] or steps[-1] > grid.end[-1]:
            raise ValueError(f"steps {steps[0]}..{steps[-1]} reach beyond the grid")
        where = grid.locate(steps)
        if np.any(np.diff(where) < 0):
            raise ValueError("steps must be in increasing order")
        starts = np.flatnonzero(np.diff(where)) + 1
        first = np.concatenate(([0], starts))
        return cls(len(grid), int(steps.size), where[first], first)

    def reduce(self, values: np.ndarray, how: str) -> np.ndarray:
        """Per bucket: ``min``, ``max``, ``mean`` or ``last`` of the finite values (NaN if
        none); ``count`` the points, ``nonfinite`` the NaN/inf ones, ``sum`` the values."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size != self.points:
            raise ValueError(f"{self.points} steps were placed but values has {values.size}")
        if how not in _REDUCTIONS:
            raise ValueError(f"how must be one of {', '.join(_REDUCTIONS)}: {how!r}")
        counting = how in ("count", "nonfinite", "sum")
        out = np.full(self.size, 0.0 if counting else np.nan)
        if self.points == 0:
            return out
        first, finite = self.first, np.isfinite(values)
        if how == "count":
            out[self.filled] = np.diff(np.append(first, values.size))
            return out
        if how == "nonfinite":
            out[self.filled] = np.add.reduceat(~finite, first, dtype=np.int64)
            return out
        clean = values if finite.all() else np.where(finite, values, np.nan)
        if how == "sum":
            out[self.filled] = np.add.reduceat(np.nan_to_num(clean), first)
            return out
        count = np.add.reduceat(finite, first, dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            if how == "min":
                got = np.fmin.reduceat(clean, first)
            elif how == "max":
                got = np.fmax.reduceat(clean, first)
            elif how == "mean":
                got = np.add.reduceat(np.nan_to_num(clean), first) / np.maximum(count, 1)
            else:  # last
                index = np.where(finite, np.arange(values.size), -1)
                last = np.maximum.reduceat(index, first)
                got = np.where(last >= 0, values[np.maximum(last, 0)], np.nan)
        out[self.filled] = np.where(count > 0, got, np.nan)
        return out


_REDUCTIONS = ("min", "max", "mean", "last", "count", "nonfinite", "sum")


def reduce(grid: Grid, steps: np.ndarray, values: np.ndarray, how: str) -> np.ndarray:
    """``values`` at step-sorted ``steps`` reduced per bucket of ``grid`` (see
    :meth:`Bucketed.reduce`); place the steps once with :meth:`Bucketed.place` to
    reduce several columns."""
    return Bucketed.place(grid, steps).reduce(values, how)


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
    entry makes its run inf (values are norms, never negative)."""
    clean = np.where(np.isfinite(values), values, np.inf)
    return np.maximum.reduceat(clean, starts, axis=axis)

"""Bounded views of long series: min/max envelopes per bucket, so no spike is dropped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default number of buckets a series is reduced to.
BUCKETS = 2000


@dataclass(frozen=True)
class Envelope:
    """A series reduced to buckets of consecutive points.

    Attributes:
        start: first step of each bucket.
        end: last step of each bucket.
        low: smallest finite value in the bucket (NaN when it has none).
        high: largest finite value in the bucket (NaN when it has none).
        mean: mean of the finite values (NaN when none).
        nonfinite: ``True`` where the bucket holds a NaN or inf.
    """

    start: np.ndarray
    end: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray
    nonfinite: np.ndarray

    def __len__(self) -> int:
        return int(self.start.size)


def bucket_starts(n: int, buckets: int = BUCKETS) -> np.ndarray:
    """Start indices of at most ``buckets`` near-equal runs of ``n`` points."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, int(buckets)))
    return np.unique((np.arange(k, dtype=np.int64) * n) // k)


def envelope(steps: np.ndarray, values: np.ndarray, buckets: int = BUCKETS) -> Envelope:
    """Reduce ``values`` at ``steps`` to at most ``buckets`` min/max/mean buckets."""
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if steps.size != values.size:
        raise ValueError(f"steps has {steps.size} entries but values has {values.size}")
    idx = bucket_starts(values.size, buckets)
    if idx.size == 0:
        empty = np.zeros(0)
        return Envelope(
            empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty, empty.astype(bool)
        )
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        low = np.minimum.reduceat(np.where(finite, values, np.inf), idx)
        high = np.maximum.reduceat(np.where(finite, values, -np.inf), idx)
        count = np.add.reduceat(finite.astype(np.int64), idx)
        total = np.add.reduceat(np.where(finite, values, 0.0), idx)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    low[count == 0] = np.nan
    high[count == 0] = np.nan
    bad = np.add.reduceat((~finite).astype(np.int64), idx) > 0
    ends = np.append(idx[1:], values.size) - 1
    return Envelope(steps[idx], steps[ends], low, high, mean, bad)


def any_per_bucket(flags: np.ndarray, buckets: int = BUCKETS) -> np.ndarray:
    """``True`` for each bucket (as in :func:`envelope`) holding at least one flag."""
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    idx = bucket_starts(flags.size, buckets)
    if idx.size == 0:
        return np.zeros(0, dtype=bool)
    return np.add.reduceat(flags.astype(np.int64), idx) > 0


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


def column_groups(n: int, columns: int) -> np.ndarray:
    """Start indices that bound ``n`` heatmap columns (or rows) to at most ``columns``."""
    return bucket_starts(n, columns)

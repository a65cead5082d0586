"""Bounded rolling windows over batches of values, computed with numpy.

Each window keeps only its last ``size`` values between batches, so a rule's state and
its cost per flushed batch do not grow with the length of the run; every statistic of a
batch is computed in a few vectorised passes over ``tail + batch``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

_EMPTY = np.empty(0)


class Rolling:
    """The last ``size`` values pushed, with per-value statistics of the trailing window.

    For a batch ``values``, :meth:`push` returns, for each value, a statistic over the
    window that ends just before it (``include=False``) or at it (``include=True``),
    and how many values that window held; then it keeps the last ``size`` values.
    """

    __slots__ = ("size", "tail")

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.tail = _EMPTY

    def __len__(self) -> int:
        return len(self.tail)

    def push(
        self, values: np.ndarray, stat: str = "median", include: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        out, counts = self.push_sorted(values, (stat,), include)
        return out[stat], counts

    def push_sorted(
        self, values: np.ndarray, stats: tuple[str, ...], include: bool = False
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Several statistics of each trailing window from one sort of the windows."""
        values = np.asarray(values, dtype=np.float64)
        both = np.concatenate([self.tail, values])
        first = len(self.tail) + int(include) - self.size  # values[i]'s window: both[first + i:]
        self.tail = both[-self.size :] if len(both) > self.size else both
        if first >= 0:  # every window full: the usual case, past the first values of a run
            windows = np.sort(_windows(both[first:], len(values), self.size), axis=1)
            out = {stat: _SORTED[stat](windows) for stat in stats}
            return out, np.full(len(values), self.size)
        ends = first + self.size + np.arange(len(values))  # window = both[e-size:e]
        out = {stat: np.full(len(values), np.nan) for stat in stats}
        full = ends >= self.size
        if full.any():
            starts = ends[full] - self.size
            windows = np.sort(both[starts[:, None] + np.arange(self.size)], axis=1)
            for stat in stats:
                out[stat][full] = _SORTED[stat](windows)
        for i in np.flatnonzero(~full & (ends > 0)):  # the first values of a run only
            window = np.sort(both[: ends[i]])[None, :]
            for stat in stats:
                out[stat][i] = _SORTED[stat](window)[0]
        return out, np.minimum(ends, self.size)

    def statistic(self, stat: str = "median") -> float:
        """The statistic of the values held now (NaN when empty)."""
        return float(_REDUCERS[stat](self.tail)) if len(self.tail) else float("nan")


def _windows(values: np.ndarray, count: int, size: int) -> np.ndarray:
    """The ``count`` successive windows of ``size`` values from the start of ``values``
    (contiguous), as a read-only view: ``sliding_window_view`` without its overhead."""
    if count + size - 1 > len(values):
        raise ValueError(f"{count} windows of {size} need {count + size - 1} values")
    step = values.strides[0]
    return as_strided(values, shape=(count, size), strides=(step, step), writeable=False)


def median(values: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-d array, bit for bit (the same partition and mean),
    without its overhead."""
    n = len(values)
    middle = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]
    part = np.partition(values, [*middle, -1])
    if np.isnan(part[-1]):
        return float("nan")
    chunk = part[middle[0] : n // 2 + 1]
    return float(np.add.reduce(chunk) / len(chunk))


def _quantile(rows: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of each sorted row (linear interpolation, as numpy's default)."""
    position = q * (rows.shape[1] - 1)
    low = math.floor(position)
    high = min(low + 1, rows.shape[1] - 1)
    return rows[:, low] + (position - low) * (rows[:, high] - rows[:, low])


#: Statistics of windows whose rows are sorted. ``spread`` is half the interquartile
#: range: the median absolute deviation of a symmetric distribution, from the same sort.
_SORTED = {
    "median": lambda rows: _quantile(rows, 0.5),
    "min": lambda rows: rows[:, 0],
    "max": lambda rows: rows[:, -1],
    "spread": lambda rows: (_quantile(rows, 0.75) - _quantile(rows, 0.25)) / 2.0,
}
_REDUCERS = {"median": median, "min": np.min, "max": np.max, "mean": np.mean}


def last_finite(values: np.ndarray, carry: float, include: bool = True) -> np.ndarray:
    """For each row, the last finite value up to it (``include``) or strictly before
    it; ``carry`` (the last one of earlier batches) where the batch has none yet."""
    if not len(values):
        return np.empty(0)
    index = np.where(np.isfinite(values), np.arange(len(values)), -1)
    if not include:
        index = np.concatenate([[-1], index[:-1]])
    latest = np.maximum.accumulate(index)
    return np.where(latest >= 0, values[np.maximum(latest, 0)], carry)


class Counts:
    """Running counts of a few boolean flags over the last ``size`` observations."""

    __slots__ = ("size", "tail")

    def __init__(self, size: int, flags: int) -> None:
        self.size = int(size)
        self.tail = np.zeros((0, flags), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tail)

    def push(self, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per observation: the counts of each flag in the window ending at it, and its size."""
        flags = np.asarray(flags, dtype=np.int64).reshape(len(flags), self.tail.shape[1])
        both = np.concatenate([self.tail, flags])
        sums = np.concatenate([np.zeros((1, both.shape[1]), np.int64), np.cumsum(both, axis=0)])
        ends = len(self.tail) + np.arange(1, len(flags) + 1)
        starts = np.maximum(ends - self.size, 0)
        self.tail = both[-self.size :]
        return sums[ends] - sums[starts], ends - starts


def run_lengths(active: np.ndarray, carry: int = 0) -> np.ndarray:
    """Length of the run of ``True`` ending at each position (0 where ``False``); a run at
    the start continues one of length ``carry`` from the previous batch."""
    active = np.asarray(active, dtype=bool)
    index = np.arange(len(active))
    last_false = np.maximum.accumulate(np.where(active, -1, index)) if len(active) else index
    lengths = np.where(active, index - last_false, 0)
    return np.where(active & (last_false < 0), lengths + carry, lengths)


class Streaks:
    """Per name (a layer, a pair of layers), the current run of consecutive hits and its
    first step, as arrays aligned with the names of the latest update. The runs of names
    an update does not list are kept for when they return: at most one entry per name
    ever seen."""

    __slots__ = ("_away", "first", "length", "names")

    def __init__(self) -> None:
        self.names: tuple[object, ...] = ()
        self.length = np.zeros(0, dtype=np.int64)
        self.first = np.zeros(0, dtype=np.int64)
        self._away: dict[object, tuple[int, int]] = {}

    def update(
        self, step: int, names: tuple[object, ...], hits: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Record ``hits`` (aligned with ``names``) at ``step``; per name, the length of
        its run of hits (0 where not hit) and the run's first step."""
        if names is not self.names and names != self.names:
            self._rekey(names)
        hits = np.asarray(hits, dtype=bool)
        self.first = np.where(hits & (self.length == 0), step, self.first)
        self.length = np.where(hits, self.length + 1, 0)
        return self.length, self.first

    def _rekey(self, names: tuple[object, ...]) -> None:
        """Align the runs with ``names``, setting aside those of names no longer listed."""
        self._away.update(zip(self.names, zip(self.length.tolist(), self.first.tolist())))
        runs = [self._away.pop(name, (0, 0)) for name in names]
        self.names = names
        self.length = np.array([length for length, _ in runs], dtype=np.int64)
        self.first = np.array([first for _, first in runs], dtype=np.int64)

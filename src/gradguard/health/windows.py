"""Bounded windows and counters for online rules: latches, runs, rolling medians.

Every structure here holds at most a fixed number of values, so the monitor's cost
per step does not grow with the length of the run.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class Latch:
    """Emit once when a condition becomes active; re-arm after it stays clear.

    ``update(active)`` returns ``True`` only on the first active observation while
    armed. After firing, ``rearm`` consecutive inactive observations arm it again.
    """

    __slots__ = ("armed", "clear")

    def __init__(self) -> None:
        self.armed = True
        self.clear = 0

    def update(self, active: bool, rearm: int) -> bool:
        if active:
            self.clear = 0
            if self.armed:
                self.armed = False
                return True
            return False
        if not self.armed:
            self.clear += 1
            if self.clear >= rearm:
                self.armed = True
        return False


class Run:
    """Length and first step of the current run of consecutive hits."""

    __slots__ = ("first", "length", "peak")

    def __init__(self) -> None:
        self.length = 0
        self.first = 0
        self.peak = 0.0

    def update(self, hit: bool, step: int, value: float = 0.0) -> int:
        if hit:
            if self.length == 0:
                self.first = step
                self.peak = value
            else:
                self.peak = max(self.peak, value)
            self.length += 1
        else:
            self.length = 0
        return self.length


class RollingMedian:
    """Median of the last ``size`` values."""

    __slots__ = ("values",)

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def push(self, value: float) -> None:
        self.values.append(value)

    def median(self) -> float:
        return statistics.median(self.values)


class FlagWindow:
    """The last ``size`` observations of a few boolean flags, with running counts."""

    __slots__ = ("counts", "rows", "size", "values")

    def __init__(self, size: int, flags: int) -> None:
        self.size = size
        self.rows: deque[tuple[bool, ...]] = deque()
        self.values: deque[float] = deque()
        self.counts = [0] * flags

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.size

    def push(self, flags: tuple[bool, ...], value: float) -> None:
        if len(self.rows) == self.size:
            old = self.rows.popleft()
            self.values.popleft()
            for i, flag in enumerate(old):
                self.counts[i] -= flag
        self.rows.append(flags)
        self.values.append(value)
        for i, flag in enumerate(flags):
            self.counts[i] += flag

    def share(self, index: int) -> float:
        return self.counts[index] / len(self.rows) if self.rows else 0.0


class HalvesTrend:
    """Means of the older and newer halves of the last ``2 × half`` values."""

    __slots__ = ("half", "new", "new_sum", "old", "old_sum", "pushes")

    def __init__(self, half: int) -> None:
        self.half = half
        self.pushes = 0
        self.old: deque[float] = deque()
        self.new: deque[float] = deque()
        self.old_sum = 0.0
        self.new_sum = 0.0

    @property
    def full(self) -> bool:
        return len(self.old) == self.half

    def push(self, value: float) -> None:
        if len(self.new) == self.half:
            moved = self.new.popleft()
            self.new_sum -= moved
            if len(self.old) == self.half:
                self.old_sum -= self.old.popleft()
            self.old.append(moved)
            self.old_sum += moved
        self.new.append(value)
        self.new_sum += value
        self.pushes += 1
        if self.pushes % (4 * self.half) == 0:  # drop rounding drift of the running sums
            self.old_sum, self.new_sum = math.fsum(self.old), math.fsum(self.new)

    def means(self) -> tuple[float, float]:
        return self.old_sum / len(self.old), self.new_sum / len(self.new)

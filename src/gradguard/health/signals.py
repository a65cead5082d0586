"""Measurements several rules read, computed once per batch.

:class:`NormBaseline` (the total norm against its recent median) serves the spike,
exploding and learning-rate rules; :class:`LossTrend` (a smoothed loss, its best and
its initial level) the loss rules, the run-lost verdict and the learning-rate rule;
:class:`ClipActivity` (where norms sit relative to the clip threshold) the clip rules;
:class:`LayerSnapshot` (one snapshot grouped into layers, with the dead, vanishing and
adjacent-ratio flags) the layer rules. Each declares the thresholds it reads that no
single rule owns. Every array is aligned with the rows of the batch the rules see.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layers import group_index
from . import _check as check
from .base import Signal, Steps, Threshold
from .windows import Counts, Rolling, last_finite, median


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


class NormBaseline(Signal):
    """The total norm against the rolling median of the previous finite norms (log scale).

    Per row: ``median`` (log10 of that median; ``level`` has it for every row, finite or
    not), ``ratio`` (norm / median; NaN until
    ``min_history`` norms are in the window), ``outlier`` (the ratio is at least
    ``jump_factor`` and ``outlier_spreads`` spreads, half the interquartile range of the
    window's log-norms) and ``early`` (the median of the run's first ``min_history`` norms).
    """

    thresholds = (
        Threshold(
            "jump_factor",
            10.0,
            check.greater_than_one,
            "a norm this many times its recent median is an outlier",
        ),
        Threshold(
            "outlier_spreads",
            6.0,
            check.positive,
            "an outlier must also sit this many spreads (half the interquartile range of the "
            "window's log-norms) above the median, so naturally heavy-tailed norms are not",
        ),
        Threshold(
            "baseline_window",
            32,
            check.count,
            "steps in the rolling median outliers are judged against",
        ),
        Threshold(
            "min_history",
            8,
            check.count,
            "steps needed in the baseline before outliers are judged",
        ),
    )

    @classmethod
    def check_config(cls, values: Any) -> None:
        if values["min_history"] > values["baseline_window"]:
            raise ValueError(
                f"min_history must be <= baseline_window ({values['baseline_window']}), "
                f"got {values['min_history']}"
            )

    def __init__(self, config) -> None:
        super().__init__(config)
        self._median = Rolling(config.baseline_window)
        self._first: list[float] = []  # log10 of the run's first finite norm
        n = 0
        self.median = self.ratio = self.early = self.level = _nan(n)
        self.outlier = np.zeros(n, dtype=bool)

    def update(self, steps: Steps) -> None:
        c = self.config
        n = len(steps)
        valid = np.isfinite(steps.norm) & (steps.norm > 0.0)
        logs = np.log10(steps.norm[valid])
        found, count = self._median.push_sorted(logs, ("median", "spread"))
        median, spread = found["median"], found["spread"]
        self.median, self.ratio, self.early = _nan(n), _nan(n), _nan(n)
        self.median[valid] = median
        # every row, valid or not: the median of the finite norms before it
        index = np.flatnonzero(valid)
        following = np.searchsorted(index, np.arange(n))
        after = self._median.statistic()
        padded = np.concatenate([median, [after]])
        self.level = np.where(valid, self.median, padded[following]) if n else _nan(0)
        ready = count >= c.min_history
        ratio = np.where(ready, 10.0 ** (logs - median), np.nan)
        self.ratio[valid] = ratio
        self.ratio[np.isfinite(steps.norm) & (steps.norm == 0.0)] = 0.0
        with np.errstate(invalid="ignore"):
            jump = np.maximum(math.log10(c.jump_factor), c.outlier_spreads * spread)
            outlier = np.log10(ratio) >= jump
        self.outlier = np.zeros(n, dtype=bool)
        self.outlier[valid] = outlier
        early = np.full(len(logs), np.nan)
        if self._first:
            early[:] = self._first[0]
        elif len(logs):
            self._first.append(float(logs[0]))
            early[1:] = logs[0]
        self.early[valid] = early

    def current(self) -> float:
        """The median norm of the window now (NaN before any finite norm)."""
        return 10.0 ** self._median.statistic() if len(self._median) else math.nan

    def first(self) -> float:
        """The run's first finite, positive norm (NaN before one)."""
        return 10.0 ** self._first[0] if self._first else math.nan


class LossTrend(Signal):
    """The loss smoothed by a rolling median, its best level and its initial level.

    Per row: ``median`` (of the last ``loss_window`` finite losses, NaN until the
    window is full or when the row's loss is not finite), ``initial`` (the level the run
    started at: the first loss, measured before any update, or the median of the first
    ``loss_window`` losses when that is lower; a first loss under half that median may be
    a lucky batch, and the median is taken) and ``best`` (the lowest of ``initial`` and the
    medians so
    far); ``seen`` counts the finite losses so far and ``first_step`` is the first step
    with one; ``fitted`` marks rows whose smoothed loss is down to ``fitted_loss`` × the
    initial level; ``log_noise`` is the batch losses' spread in log space (the standard
    deviation a Gaussian would have), from the median size of the successive
    differences of their logs over the last ``noise_window`` (a trend barely moves it;
    NaN until two positive losses follow each other).
    """

    thresholds = (
        Threshold(
            "loss_window",
            7,
            check.counter(3),
            "losses in the rolling median that smooths single noisy or corrupt batches",
        ),
        Threshold(
            "fitted_loss",
            1e-3,
            check.fraction,
            "a smoothed loss this share of the initial one means the model fits its data: "
            "vanishing gradients are then the fit, not a fault (classifiers on scikit-learn's "
            "tables trained 2,000 steps reach 1e-4 to 1e-8 of their initial loss)",
        ),
    )

    #: Losses whose successive log differences give ``log_noise``.
    noise_window = 100
    #: The median of |x - y| for independent x, y of a unit Gaussian.
    _MEDIAN_DIFFERENCE = 0.954

    def __init__(self, config) -> None:
        super().__init__(config)
        self._window = Rolling(config.loss_window)
        self._differences = Rolling(self.noise_window)
        self._last_log = math.nan
        self._log_noise = math.nan
        self.log_noise = _nan(0)
        self._beyond: dict[tuple[float, float], np.ndarray] = {}
        self.total = 0
        self.best_so_far = math.inf
        self.initial_level = math.nan
        self.first_loss = math.nan
        self.first_step: int | None = None
        self.median = self.best = self.initial = self.seen = _nan(0)
        self.fitted = np.zeros(0, dtype=bool)

    def update(self, steps: Steps) -> None:
        w = self.config.loss_window
        n = len(steps)
        valid = np.isfinite(steps.loss)
        losses = steps.loss[valid]
        if len(losses) and self.first_step is None:
            self.first_step = int(steps.step[valid][0])
            self.first_loss = float(losses[0])
        median, _ = self._window.push(losses, include=True)
        seen = self.total + np.arange(1, len(losses) + 1)
        median = np.where(seen >= w, median, np.nan)
        if math.isnan(self.initial_level) and len(losses) and seen[-1] >= w:
            first_median = float(median[np.argmax(seen >= w)])
            start = self.first_loss
            lucky = start < first_median - 0.5 * abs(first_median)
            self.initial_level = first_median if lucky else min(start, first_median)
            self.best_so_far = min(self.best_so_far, self.initial_level)
        best = np.fmin.accumulate(np.concatenate([[self.best_so_far], median]))[1:]
        self.total += len(losses)
        if len(best):
            self.best_so_far = float(best[-1])
        self.median, self.best, self.initial, self.seen = _nan(n), _nan(n), _nan(n), _nan(n)
        self.median[valid], self.best[valid], self.seen[valid] = median, best, seen
        self.initial[valid] = np.where(seen >= w, self.initial_level, np.nan)
        with np.errstate(invalid="ignore"):
            self.fitted = self._is_fitted(self.median, self.initial)
        self.log_noise = _nan(n)
        self.log_noise[valid] = self._noise_of(losses)
        self._beyond = {}

    def beyond_noise(self, factor: float, z: float) -> np.ndarray:
        """Per row, whether a positive smoothed loss is further above its best than
        ``factor`` and its noise explain: ``z`` standard errors of a median of
        ``loss_window`` losses, plus the depth ``sqrt(2 ln n)`` such errors give the
        minimum of ``n`` independent medians (``n``: losses seen / loss_window). True
        where it cannot be judged (a loss at or below zero, no noise measured yet).
        Computed once per batch for each ``(factor, z)`` (several rules ask); read-only."""
        found = self._beyond.get((factor, z))
        if found is None:
            found = self._beyond[(factor, z)] = self._beyond_noise(factor, z)
            found.flags.writeable = False
        return found

    def _beyond_noise(self, factor: float, z: float) -> np.ndarray:
        w = self.config.loss_window
        error = 1.25 * self.log_noise / math.sqrt(w)  # a median's standard error
        medians = np.maximum(self.seen / w, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            margin = math.log(factor) + error * (z + np.sqrt(2.0 * np.log(medians)))
            judged = (self.best > 0) & (self.median > 0) & np.isfinite(error)
            ratio = np.where(judged, self.median / self.best, 1.0)
            return ~judged | (np.log(ratio) >= margin)

    def _noise_of(self, losses: np.ndarray) -> np.ndarray:
        """``log_noise`` at each of ``losses`` (finite ones, in order)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.where(losses > 0, losses, np.nan))
        steps = np.abs(np.diff(np.concatenate([[self._last_log], logs])))
        known = np.isfinite(steps)
        medians, _ = self._differences.push(steps[known], include=True)
        noise = np.full(len(losses), np.nan)
        noise[known] = medians / self._MEDIAN_DIFFERENCE
        noise = last_finite(noise, self._log_noise)  # a row without a difference keeps it
        if len(losses):
            self._last_log = float(logs[-1])
            self._log_noise = float(noise[-1])
        return noise

    def current(self) -> float:
        """The latest smoothed loss (NaN before the window fills)."""
        if self.total < self.config.loss_window:
            return math.nan
        return self._window.statistic()

    def fitted_now(self) -> bool:
        """Whether the latest smoothed loss says the model fits its data (see ``fitted``)."""
        return bool(self._is_fitted(self.current(), self.initial_level))

    def _is_fitted(self, smoothed: Any, initial: Any) -> Any:
        return smoothed <= self.config.fitted_loss * np.abs(initial)


IDLE, CLIPPED, HOVER = 0, 1, 2


class ClipActivity(Signal):
    """Where the norm sits relative to the clip threshold over the last ``clip_window``
    steps that had one in force: idle, clipped, hovering; and whether the threshold was
    fixed over that window (an adaptive clipper's threshold follows the norm)."""

    thresholds = (
        Threshold("clip_window", 100, check.counter(2), "steps over which clip activity is read"),
        Threshold(
            "clip_idle_below",
            0.3,
            check.fraction,
            "a step under this fraction of the threshold leaves clipping idle (seed 004: 0.3)",
        ),
        Threshold(
            "hover_band",
            (0.8, 1.25),
            lambda name, value: _hover_band(name, value),
            "(low, high) band of norm / threshold counted as at the threshold",
        ),
    )

    def __init__(self, config) -> None:
        super().__init__(config)
        self._counts = Counts(config.clip_window, 3)
        self._steps = Rolling(config.clip_window)
        self._ratios = Rolling(config.clip_window)
        self._last_threshold = math.nan
        self._changed_at = -math.inf  # the step the threshold last changed
        n = 0
        self.active = np.zeros(n, dtype=bool)
        self.flags = np.zeros((n, 3), dtype=bool)  #: this row is idle, clipped, hovering
        self.shares = np.zeros((n, 3))
        self.size = np.zeros(n, dtype=np.int64)
        self.first_step = _nan(n)
        self.fixed = np.zeros(n, dtype=bool)
        self._recent = np.empty(0)
        self._end = np.zeros(n, dtype=np.int64)

    def update(self, steps: Steps) -> None:
        c = self.config
        n = len(steps)
        active = np.isfinite(steps.norm) & np.isfinite(steps.threshold) & (steps.threshold > 0)
        self.active = active
        rows = np.flatnonzero(active)
        norm, threshold = steps.norm[rows], steps.threshold[rows]
        r = norm / threshold
        clipped = np.where(np.isfinite(steps.clipped[rows]), steps.clipped[rows] == 1.0, r > 1.0)
        low, high = c.hover_band
        flags = np.empty((len(rows), 3), dtype=bool)
        flags[:, IDLE], flags[:, CLIPPED] = r < c.clip_idle_below, clipped
        flags[:, HOVER] = (low <= r) & (r <= high)
        counts, size = self._counts.push(flags)
        at = steps.step[rows].astype(np.float64)
        # steps only grow: a window's first step is that of its oldest row
        steps_both = np.concatenate([self._steps.tail, at])
        ends = len(self._steps.tail) + np.arange(1, len(rows) + 1)
        first = steps_both[np.maximum(ends - c.clip_window, 0)] if len(rows) else at
        self._steps.tail = steps_both[-c.clip_window :]
        self._recent = np.concatenate([self._ratios.tail, r])
        self._end = np.zeros(n, dtype=np.int64)
        self._end[rows] = len(self._ratios.tail) + np.arange(1, len(rows) + 1)
        self._ratios.tail = self._recent[-c.clip_window :]
        previous = np.concatenate([[self._last_threshold], threshold[:-1]])
        # np.isclose(threshold, previous, rtol=1e-6, atol=0.0), negated, for a finite
        # threshold (a NaN previous one, before any, is a change)
        changed = ~(np.abs(threshold - previous) <= 1e-6 * np.abs(previous))
        changed_at = np.where(changed, at, -np.inf)
        changed_at = np.maximum.accumulate(np.concatenate([[self._changed_at], changed_at]))[1:]
        if len(rows):
            self._last_threshold, self._changed_at = float(threshold[-1]), float(changed_at[-1])
        self.flags = np.zeros((n, 3), dtype=bool)
        self.flags[rows] = flags
        self.shares = np.zeros((n, 3))
        self.shares[rows] = counts / np.maximum(size, 1)[:, None]
        self.size = np.zeros(n, dtype=np.int64)
        self.size[rows] = size
        self.first_step = _nan(n)
        self.first_step[rows] = first
        self.fixed = np.zeros(n, dtype=bool)
        self.fixed[rows] = changed_at <= first  # unchanged over the whole window

    @property
    def full(self) -> np.ndarray:
        return self.size >= self.config.clip_window

    def median_ratio(self, row: int) -> float:
        """The median of norm / threshold over the window ending at ``row``."""
        window = self.window_ratios(row)
        return median(window) if len(window) else float("nan")

    def window_ratios(self, row: int) -> np.ndarray:
        """norm / threshold over the window ending at ``row`` of the last batch."""
        end = int(self._end[row])
        return self._recent[max(0, end - self.config.clip_window) : end]


def _hover_band(name: str, value: object) -> tuple[float, float]:
    low, high = check.band(name, value)
    if not low < 1.0 < high:
        raise ValueError(f"{name} must contain 1.0 strictly inside, got ({low}, {high})")
    return (low, high)


@dataclass(frozen=True)
class LayerSnapshot:
    """One per-tensor snapshot grouped into layers, with the flags the layer rules share.

    Attributes:
        step: the snapshot's step.
        layers: layer (group) names in model order.
        values: their norms (the L2 norm of the member tensors' norms).
        largest: the largest layer norm.
        dead: per layer, the norm is exactly zero.
        low: per layer, the norm vanishes (absolute or relative to ``largest``).
        ratios: per adjacent pair (see :attr:`pairs`), the larger norm over the smaller,
            1.0 where either is weak.
        unreached: layers whose parameters require grad but got no gradient at all.
    """

    step: int
    layers: tuple[str, ...]
    values: np.ndarray
    largest: float
    dead: np.ndarray
    low: np.ndarray
    ratios: np.ndarray
    unreached: tuple[str, ...] = ()

    @property
    def weak(self) -> np.ndarray:
        """Per layer, dead or vanishing now (their own findings explain them)."""
        return self.dead | self.low

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The adjacent pairs of layers ``(a, b)``, aligned with :attr:`ratios`."""
        return _pairs(self.layers)

    def adjacent_jump(self, limit: float) -> bool:
        """Whether an adjacent pair differs by more than ``limit``."""
        return bool((self.ratios > limit).any())

    @classmethod
    def build(
        cls,
        step: int,
        names: tuple[str, ...],
        norms: np.ndarray,
        config,
        unreached: tuple[str, ...] = (),
    ) -> LayerSnapshot:
        """Group ``norms`` (aligned with ``names``) by owning module and flag each layer."""
        norms = np.asarray(norms, dtype=np.float64)
        if config.group_by_module:
            layers, index = _groups(names)
            sums = np.bincount(index, weights=np.square(norms), minlength=len(layers))
            values = np.sqrt(sums)
        else:
            layers, values = names, norms
        largest = float(values.max())
        dead = values == 0.0
        low = ~dead & (
            (values < config.vanish_layer) | (values < config.vanish_layer_relative * largest)
        )
        weak = dead | low
        with np.errstate(divide="ignore", invalid="ignore"):
            jumps = np.maximum(values[:-1], values[1:]) / np.minimum(values[:-1], values[1:])
        ratios = np.where(weak[:-1] | weak[1:], 1.0, jumps)
        return cls(step, tuple(layers), values, largest, dead, low, ratios, unreached)


@functools.lru_cache(maxsize=16)
def _groups(names: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """The layers of ``names`` and each name's layer position (an index array)."""
    layers, index = group_index(names)
    array = np.asarray(index, dtype=np.int64)
    array.flags.writeable = False  # shared by every snapshot of these names
    return layers, array


@functools.lru_cache(maxsize=16)
def _pairs(layers: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(itertools.pairwise(layers))


#: Every signal class (their thresholds join HealthConfig).
SIGNALS: tuple[type[Signal], ...] = (NormBaseline, LossTrend, ClipActivity)

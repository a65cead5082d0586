"""Measurements several rules read, computed once per step or snapshot.

:class:`NormBaseline` (the total norm against its rolling median) serves the spike and
exploding rules; :class:`ClipActivity` (where norms sit relative to the clip threshold)
the three clip rules; :class:`LayerSnapshot` (one snapshot grouped into layers, with
the dead, vanishing and adjacent-ratio flags) the layer rules. Each declares the
thresholds it reads that no single rule owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..layers import group_index
from . import _check as check
from .base import NAN, Signal, StepRow, Threshold
from .windows import FlagWindow, RollingMedian, Run


class NormBaseline(Signal):
    """The total norm against the rolling median of the previous finite steps (log scale).

    ``ratio`` is ``norm / median`` (NaN until ``min_history`` steps are in the window);
    ``outliers`` the current run of steps with ``ratio >= jump_factor``; ``previous``
    that run as it stood before this step; ``base`` the median when the run began.
    """

    thresholds = (
        Threshold(
            "jump_factor",
            10.0,
            check.greater_than_one,
            "a step this many times above the recent median is an outlier",
        ),
        Threshold(
            "baseline_window",
            32,
            check.count,
            "steps in the rolling median outliers are judged against",
        ),
        Threshold(
            "min_history", 8, check.count, "steps needed in the baseline before outliers are judged"
        ),
    )

    @classmethod
    def check_config(cls, values) -> None:
        if values["min_history"] > values["baseline_window"]:
            raise ValueError(
                f"min_history must be <= baseline_window ({values['baseline_window']}), "
                f"got {values['min_history']}"
            )

    def __init__(self, config) -> None:
        super().__init__(config)
        self._median = RollingMedian(config.baseline_window)
        self.outliers = Run()
        self.previous = (0, 0, 0.0)  # (length, first, peak) before this step
        self.ratio = NAN
        self.outlier = False
        self.base = NAN
        self.last_step = 0  # the previous finite step

    def before_step(self, row: StepRow) -> None:
        c = self.config
        ratio = NAN
        if len(self._median) >= c.min_history and row.norm > 0.0:
            ratio = row.norm / 10.0 ** self._median.median()
        self.ratio = ratio
        self.outlier = ratio >= c.jump_factor
        run = self.outliers
        self.previous = (run.length, run.first, run.peak)
        if self.outlier and run.length == 0:
            self.base = row.norm / ratio
        run.update(self.outlier, row.step, ratio)

    def after_step(self, row: StepRow) -> None:
        if row.norm > 0.0:
            self._median.push(math.log10(row.norm))
        self.last_step = row.step

    def __len__(self) -> int:
        return len(self._median)


IDLE, CLIPPED, HOVER = 0, 1, 2


class ClipActivity(Signal):
    """The last ``clip_window`` steps with a clip threshold in force: idle, clipped, hovering."""

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
        self.window = FlagWindow(config.clip_window, 3)
        self.active = False  #: a threshold was in force at the current step
        self.threshold = NAN

    def before_step(self, row: StepRow) -> None:
        c = self.config
        self.active = math.isfinite(row.threshold) and row.threshold > 0.0
        if not self.active:
            return  # no clip in force: clip activity says nothing
        self.threshold = row.threshold
        r = row.norm / row.threshold
        was_clipped = row.clipped == 1.0 if math.isfinite(row.clipped) else r > 1.0
        low, high = c.hover_band
        self.window.push((r < c.clip_idle_below, was_clipped, low <= r <= high), row.norm)

    def share(self, flag: int) -> float:
        return self.window.share(flag)

    @property
    def full(self) -> bool:
        return self.window.full

    def first_step(self, step: int) -> int:
        """The first step of the window ending at ``step``."""
        return step - len(self.window) + 1


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
        ratios: ``(a, b, ratio)`` for each adjacent pair, 1.0 where either is weak.
    """

    step: int
    layers: tuple[str, ...]
    values: tuple[float, ...]
    largest: float
    dead: tuple[bool, ...]
    low: tuple[bool, ...]
    ratios: tuple[tuple[str, str, float], ...]

    @property
    def weak(self) -> frozenset[str]:
        """Layers dead or vanishing now (their own findings explain them)."""
        return frozenset(n for n, d, w in zip(self.layers, self.dead, self.low) if d or w)

    def adjacent_jump(self, limit: float) -> bool:
        """Whether an adjacent pair differs by more than ``limit``."""
        return any(r > limit for *_, r in self.ratios)

    @classmethod
    def build(cls, step: int, names: tuple[str, ...], norms: list[float], config) -> LayerSnapshot:
        """Group ``norms`` (aligned with ``names``) by owning module and flag each layer."""
        if config.group_by_module:
            groups, index = group_index(names)
            sums = np.zeros(len(groups))
            np.add.at(sums, np.asarray(index, dtype=np.int64), np.square(norms))
            layers, values = groups, tuple(math.sqrt(s) for s in sums.tolist())
        else:
            layers, values = names, tuple(norms)
        largest = max(values)
        dead = tuple(v == 0.0 for v in values)
        low = tuple(
            not d and (v < config.vanish_layer or v < config.vanish_layer_relative * largest)
            for v, d in zip(values, dead)
        )
        weak = {n for n, d, w in zip(layers, dead, low) if d or w}
        ratios = tuple(
            (a, b, max(va, vb) / min(va, vb) if a not in weak and b not in weak else 1.0)
            for (a, va), (b, vb) in zip(zip(layers, values), zip(layers[1:], values[1:]))
        )
        return cls(step, tuple(layers), values, largest, dead, low, ratios)


#: Every signal class (their thresholds join HealthConfig).
SIGNALS: tuple[type[Signal], ...] = (NormBaseline, ClipActivity)

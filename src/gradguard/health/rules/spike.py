"""``spike``: a short order-of-magnitude outlier of the total norm (one bad batch)."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..advice import CLIP
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend, NormBaseline


class Spike(Rule):
    kind = "spike"
    severity = Severity.INFO
    scope = "step"
    condition = (
        "the total norm is an outlier (>= jump_factor × its rolling median, and outlier_spreads "
        "spreads, half the interquartile range of the log-norms, above it) for fewer than "
        "`jump_sustain` steps in a row, and peaks at >= spike_factor × that median; and "
        "either the loss at a step of it is above the run's initial loss or the peak norm "
        "above jump_factor × the run's first norm (the first norm, without a loss): a model "
        "that fits most of its data, whose few hard examples give gradients of the size "
        "training started with, has neither"
    )
    advice = (
        "Inspect the batches at these steps for corrupt or outlier samples.",
        CLIP + " Or skip outlier steps with a spike policy.",
    )
    thresholds = (
        Threshold(
            "spike_factor",
            100.0,
            check.greater_than_one,
            "a single-step outlier must reach this many times the recent median: steps 10–25× "
            "the median occur naturally once a classifier has converged and a few hard "
            "examples carry the gradient (measured on healthy runs of the diagnosis corpus)",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.baseline = context.signal(NormBaseline)
        self.loss = context.signal(LossTrend)
        self.tracker = Tracker(self.kind, 1, 1)

    def on_steps(self, steps: Steps) -> None:
        b = self.baseline
        outlier = b.outlier & steps.finite
        for change in self.tracker.feed(steps.step, outlier)[0]:
            episode = change.episode
            rows = np.arange(change.lo, change.hi + 1)
            rows = rows[outlier[rows]]
            stats = episode.stats
            if len(rows):
                stats.setdefault("base", float(steps.norm[rows[0]] / b.ratio[rows[0]]))
                stats["peak"] = max(stats.get("peak", 0.0), float(np.max(b.ratio[rows])))
                stats["count"] = stats.get("count", 0) + len(rows)
                stats["norm"] = max(stats.get("norm", 0.0), float(np.max(steps.norm[rows])))
                stats["early"] = float(10.0 ** b.early[rows[0]])
                losses = steps.loss[rows]
                if np.any(np.isfinite(losses)):
                    stats["loss"] = max(stats.get("loss", -math.inf), float(np.nanmax(losses)))
                if not math.isnan(self.loss.initial_level):
                    stats["initial_loss"] = self.loss.initial_level
            if episode.open or stats["count"] >= self.config.jump_sustain:
                continue  # reported once it ends; a longer run is the exploding rule's
            if stats["peak"] < self.config.spike_factor:
                continue  # a natural swing of heavy-tailed norms
            if _a_fitted_models_hard_batch(stats, self.config.jump_factor):
                continue
            self.report(
                episode,
                f"gradient norm spiked {stats['peak']:.3g}× above its recent median "
                f"({stats['base']:.3g}) for {stats['count']} step(s)",
                {
                    "peak_ratio": stats["peak"],
                    "baseline_median": stats["base"],
                    "length": stats["count"],
                },
            )


def _a_fitted_models_hard_batch(stats: dict, factor: float) -> bool:
    """The gradient of the few examples a model that fits the rest still gets wrong, not
    a bad batch: its norm is large only next to the vanishing gradients of the fitted
    batches around it. The evidence: its loss is no higher than the run's initial loss
    and its norm under ``factor`` × the run's first norm; without a recorded loss, a norm
    no larger than the first."""
    norm, early = stats.get("norm", math.inf), stats.get("early", math.nan)
    loss, initial = stats.get("loss"), stats.get("initial_loss")
    if loss is None or initial is None:
        return norm <= early
    return loss <= initial and norm <= factor * early

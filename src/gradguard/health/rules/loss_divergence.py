"""``loss_divergence``: the loss rises far above its best level."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..advice import LOWER_LR
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend


class LossDivergence(Rule):
    kind = "loss_divergence"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "for `sustain` steps the smoothed loss (median of loss_window) exceeds its best by at "
        "least (divergence_factor - 1) × |best| and by at least divergence_progress of the "
        "progress made so far (initial - best); for positive losses, its log also exceeds "
        "the best's by log(divergence_factor) plus divergence_z standard errors of the "
        "smoothed loss and the depth its noise gives a running minimum"
    )
    advice = (
        LOWER_LR,
        "Look for what changed where it began: a learning-rate change, a bad batch, a layer "
        "that died (see the findings around that step).",
        "Clip the gradient norm, and skip outlier steps, so one update cannot undo training.",
        "Restore a checkpoint from before the divergence if the loss does not come back.",
    )
    thresholds = (
        Threshold(
            "divergence_factor",
            2.0,
            check.greater_than_one,
            "the smoothed loss must reach this many times its best to diverge",
        ),
        Threshold(
            "divergence_progress",
            0.5,
            check.fraction,
            "... and undo at least this share of the progress made since the start",
        ),
        Threshold(
            "divergence_z",
            3.0,
            check.positive,
            "... and, for positive losses, rise this many standard errors of the smoothed "
            "loss beyond the factor and beyond how deep noise alone takes its minimum "
            "(fine-tuned classifiers' batch losses spread over decades)",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.loss = context.signal(LossTrend)
        self.tracker = Tracker(self.kind, self.config.sustain, self.config.rearm_steps)

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        m, best, initial = self.loss.median, self.loss.best, self.loss.initial
        with np.errstate(invalid="ignore"):
            need = np.maximum(
                c.divergence_progress * (initial - best), (c.divergence_factor - 1) * np.abs(best)
            )
            beyond = self.loss.beyond_noise(c.divergence_factor, c.divergence_z)
            rising = (m - best >= need) & (m > best) & beyond
        for change in self.updated(self.tracker.feed(steps.step, rising)[0]):
            episode = change.episode
            rows = slice(change.lo, change.hi + 1)
            s = episode.stats
            s.setdefault("best", float(best[change.lo]))
            s.setdefault("initial", float(initial[change.lo]))
            peak = m[rows][np.isfinite(m[rows])]
            if len(peak):
                s["peak"] = max(s.get("peak", -math.inf), float(peak.max()))
                s["now"] = float(peak[-1])
            self.report(
                episode,
                f"loss diverging: up to {s['peak']:.4g} against its best {s['best']:.4g} "
                f"(×{s['peak'] / s['best']:.3g}; {s['initial']:.4g} at the start)"
                if s["best"] > 0
                else f"loss diverging: up to {s['peak']:.4g} against its best {s['best']:.4g}",
                {
                    "loss_best": s["best"],
                    "loss_peak": s["peak"],
                    "loss_now": s["now"],
                    "loss_initial": s["initial"],
                },
            )

"""``vanishing``: the total norm stays near zero."""

from __future__ import annotations

import numpy as np

from .. import _check as check
from ..advice import ACTIVATIONS, INIT, RESIDUAL_NORM
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend


class Vanishing(Rule):
    kind = "vanishing"
    severity = Severity.WARNING
    scope = "step"
    condition = (
        "total_norm < vanish_total for `sustain` steps in a row, the loss (when recorded) "
        "not down to `fitted_loss` × its initial level (a model that fits its data)"
    )
    advice = (
        ACTIVATIONS,
        RESIDUAL_NORM,
        INIT,
        "Check the loss is connected to the parameters (no detach, no zero loss scale).",
    )
    thresholds = (
        Threshold(
            "vanish_total",
            1e-6,
            check.positive,
            "total norm below which, sustained, gradients vanish (seed 000: 1e-6)",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.tracker = Tracker(self.kind, self.config.sustain, self.config.rearm_steps)
        self.loss = context.signal(LossTrend)

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        low = steps.finite & (steps.norm < c.vanish_total) & ~self.loss.fitted
        for change in self.updated(self.tracker.feed(steps.step, low)[0]):
            episode = change.episode
            rows = slice(change.lo, change.hi + 1)
            stats = episode.stats
            before = self.tracker.sustain - 1 if "count" not in stats else stats["count"]
            stats["count"] = before + int(low[rows].sum())
            # the lowest of the vanishing norms themselves: the span can hold a NaN step,
            # whose NaN would win np.min in one flush and lose to min() in another
            below = steps.norm[rows][low[rows]]
            stats["min"] = min(stats.get("min", np.inf), float(np.min(below, initial=np.inf)))
            self.report(
                episode,
                f"gradient norm below {c.vanish_total:g} for {stats['count']} steps "
                f"(lowest {stats['min']:.2e})",
                {
                    "min_norm": stats["min"],
                    "vanish_total": c.vanish_total,
                    "steps_below": stats["count"],
                },
            )

"""``loss_stall``: the run is not learning: the loss is no lower than when it started."""

from __future__ import annotations

import numpy as np

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend


class LossStall(Rule):
    kind = "loss_stall"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "in a run recorded from step 0 (a resumed run's first loss is no untrained baseline), "
        "after `stall_window` steps with a finite loss, the smoothed loss has never been more "
        "than stall_tolerance below its initial level (and is below divergence_factor × that "
        "level): the run has not learned; a loss that fell and came back up, or rises, is "
        "loss_divergence's"
    )
    advice = (
        "Check the labels and the data pipeline: shuffled or misaligned labels, inputs that "
        "do not carry the target, or a target the model cannot fit.",
        "Check that gradients reach the layers: dead, frozen or vanishing layers (see the "
        "layer findings).",
        "Try another learning rate: too high bounces (and can kill ReLUs), too low barely moves.",
    )
    thresholds = (
        Threshold(
            "stall_window",
            200,
            check.counter(4),
            "steps with a finite loss before the loss is judged",
        ),
        Threshold(
            "stall_tolerance",
            0.05,
            check.positive,
            "relative improvement on the initial loss below which the run is not learning",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.loss = context.signal(LossTrend)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        t = self.loss
        if self.context.first_step != 0:
            return  # a resumed run (or a window of one): its start is no untrained baseline
        m, best, initial, seen = t.median, t.best, t.initial, t.seen
        floor = initial - c.stall_tolerance * np.abs(initial)
        with np.errstate(invalid="ignore"):
            flat = (
                (seen >= c.stall_window)
                & (best >= floor)  # it never learned (a loss that fell and came back diverged)
                & (m >= floor)
                & (m < c.divergence_factor * np.abs(initial))
            )
        first = t.first_step if t.first_step is not None else 0
        starts = np.full(len(steps), first)
        for change in self.updated(self.tracker.feed(steps.step, flat, starts)[0]):
            episode = change.episode
            rows = slice(change.lo, change.hi + 1)
            s = episode.stats
            s.setdefault("initial", float(initial[change.lo]))
            now = m[rows][np.isfinite(m[rows])]
            if len(now):
                s["now"] = float(now[-1])
            change_share = (s["initial"] - s["now"]) / max(abs(s["initial"]), 1e-12)
            steps_seen = episode.last - episode.first + 1
            if change_share < -c.stall_tolerance:  # no flat line: it ends higher than it began
                what = f"loss worse than at the start: {s['now']:.4g} after {steps_seen} steps"
                change = f"{-change_share:.1%} higher"
            else:
                what = f"loss not improving: {s['now']:.4g} after {steps_seen} steps"
                change = f"{change_share:+.1%}"
            self.report(
                episode,
                f"{what} against {s['initial']:.4g} at the start ({change})",
                {"loss_initial": s["initial"], "loss_now": s["now"], "improvement": change_share},
            )

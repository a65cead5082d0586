"""``clip_saturated``: clipping acts on almost every step."""

from __future__ import annotations

from .. import _check as check
from ..advice import LOWER_LR
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import CLIPPED, ClipActivity, LossTrend


class ClipSaturated(Rule):
    kind = "clip_saturated"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "over `clip_window` steps, >= clip_saturated_share of them are clipped; a warning "
        "when the threshold is fixed and the median norm is >= saturated_factor × it (clipping "
        "hides much larger gradients), else information (a threshold just under the typical "
        "norm, or an adaptive clipper lagging a rising norm); not once the loss is down to "
        "`fitted_loss` × its initial level (what is clipped then moves nothing)"
    )
    advice = (
        LOWER_LR + " Clipping every step turns the optimiser into normalised SGD.",
        "Check the architecture (normalisation, residuals) and the data/loss scale.",
        "If the norms are steady and typical of {family} models, raise the threshold "
        "(recommend_threshold()).",
    )
    thresholds = (
        Threshold(
            "clip_saturated_share",
            0.9,
            check.fraction,
            "share of clipped steps that means clipping almost always acts",
        ),
        Threshold(
            "saturated_factor",
            3.0,
            check.greater_than_one,
            "median norm, in thresholds, above which saturated clipping is a warning",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.clip = context.signal(ClipActivity)
        self.loss = context.signal(LossTrend)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)

    def on_steps(self, steps: Steps) -> None:
        c, clip = self.config, self.clip
        saturated = clip.active & clip.full & (clip.shares[:, CLIPPED] >= c.clip_saturated_share)
        # the episode spans the window it was seen in, then extends over clipped steps
        saturated = saturated & clip.flags[:, CLIPPED] & ~self.loss.fitted
        for change in self.updated(self.tracker.feed(steps.step, saturated, clip.first_step)[0]):
            episode, row = change.episode, change.hi
            ratio = clip.median_ratio(row)
            s = episode.stats
            s["ratio"] = max(s.get("ratio", 0.0), ratio)
            s["adaptive"] = s.get("adaptive", False) or not bool(clip.fixed[row])
            loud = s["ratio"] >= c.saturated_factor and not s["adaptive"]
            severity = Severity.WARNING if loud else Severity.INFO
            threshold = float(steps.threshold[row])
            share = float(clip.shares[row, CLIPPED])
            self.report(
                episode,
                f"clipping acts on {share:.0%} of the last {int(clip.size[row])} steps; "
                f"median norm {ratio:.3g}× the threshold {threshold:g}",
                {"clipped_share": share, "threshold": threshold, "median_ratio": ratio},
                severity=severity,
            )

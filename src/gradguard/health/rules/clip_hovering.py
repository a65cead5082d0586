"""``clip_hovering``: the norm keeps sitting at a fixed clip threshold."""

from __future__ import annotations

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import CLIPPED, HOVER, ClipActivity


class ClipHovering(Rule):
    kind = "clip_hovering"
    severity = Severity.INFO
    scope = "window"
    condition = (
        "over `clip_window` steps under a fixed threshold, >= hover_share of the norms lie "
        "within hover_band × threshold and clipping acts on >= hover_clipped of them (under "
        "an adaptive clipper the threshold follows the norm by design: never reported)"
    )
    advice = (
        "The threshold sits at the typical norm, so clipping rescales most steps a little; "
        "if the learning rate is high, lower it or add decay (seed 004).",
        "Otherwise raise the threshold a little above the typical norm (recommend_threshold()).",
    )
    thresholds = (
        Threshold(
            "hover_share",
            0.5,
            check.fraction,
            "share of steps in hover_band that means the norm hovers there",
        ),
        Threshold(
            "hover_clipped",
            0.25,
            check.fraction,
            "share of clipped steps needed too: hovering means clipping acts",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.clip = context.signal(ClipActivity)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)

    def on_steps(self, steps: Steps) -> None:
        c, clip = self.config, self.clip
        hover = (
            clip.active
            & clip.full
            & clip.fixed
            & (clip.shares[:, HOVER] >= c.hover_share)
            & (clip.shares[:, CLIPPED] >= c.hover_clipped)
        )
        low, high = c.hover_band
        # the episode spans the window it was seen in, then extends over hover steps
        hover = hover & clip.flags[:, HOVER]
        for change in self.updated(self.tracker.feed(steps.step, hover, clip.first_step)[0]):
            row = change.hi
            threshold = float(steps.threshold[row])
            self.report(
                change.episode,
                f"gradient norm hovers at the clip threshold {threshold:g}: "
                f"{clip.shares[row, HOVER]:.0%} of the last {int(clip.size[row])} steps within "
                f"{low:g}–{high:g}× of it, {clip.shares[row, CLIPPED]:.0%} clipped",
                {
                    "hover_share": float(clip.shares[row, HOVER]),
                    "clipped_share": float(clip.shares[row, CLIPPED]),
                    "threshold": threshold,
                },
            )

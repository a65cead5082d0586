"""``clip_inactive``: a fixed clip threshold so high that clipping never acts."""

from __future__ import annotations

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import IDLE, ClipActivity
from ..threshold import recommend_threshold


class ClipInactive(Rule):
    kind = "clip_inactive"
    severity = Severity.INFO
    scope = "window"
    condition = (
        "over `clip_window` steps under a fixed threshold (an adaptive clipper's follows the "
        "norm), >= clip_idle_share of them are below clip_idle_below × threshold"
    )
    advice = (
        "Lower the threshold toward evidence['recommended_threshold'] "
        "(recommend_threshold() on recent unclipped norms).",
        "Or keep it as a deliberate safety net that only catches rare spikes.",
    )
    thresholds = (
        Threshold(
            "clip_idle_share",
            0.9,
            check.fraction,
            "share of idle steps that means clipping never acts",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.clip = context.signal(ClipActivity)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)

    def on_steps(self, steps: Steps) -> None:
        clip = self.clip
        idle = (
            clip.active
            & clip.full
            & clip.fixed
            & (clip.shares[:, IDLE] >= self.config.clip_idle_share)
        )
        # the episode spans the window it was seen in, then extends over idle steps
        idle = idle & clip.flags[:, IDLE]
        for change in self.updated(self.tracker.feed(steps.step, idle, clip.first_step)[0]):
            row = change.hi
            threshold = float(steps.threshold[row])
            norms = clip.window_ratios(row) * threshold
            try:
                advice = recommend_threshold(norms, min_samples=1)
                median, suggested = advice.median, advice.threshold
            except ValueError:  # all-zero norms: nothing to recommend
                median = suggested = 0.0
            share = float(clip.shares[row, IDLE])
            self.report(
                change.episode,
                f"clipping never acts: {share:.0%} of the last {int(clip.size[row])} steps are "
                f"below {self.config.clip_idle_below:g}× the threshold {threshold:g}",
                {
                    "idle_share": share,
                    "threshold": threshold,
                    "median_norm": median,
                    "recommended_threshold": suggested,
                },
            )

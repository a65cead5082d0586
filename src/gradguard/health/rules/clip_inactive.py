"""``clip_inactive``: a clip threshold so high that clipping never acts."""

from __future__ import annotations

from .. import _check as check
from ..base import Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..signals import IDLE, ClipActivity
from ..threshold import recommend_threshold


class ClipInactive(Rule):
    kind = "clip_inactive"
    severity = Severity.INFO
    scope = "window"
    condition = (
        "over `clip_window` steps, >= clip_idle_share of them are below clip_idle_below × threshold"
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

    def on_step(self, row: StepRow) -> None:
        clip = self.clip
        if not clip.active:
            return
        idle = clip.full and clip.share(IDLE) >= self.config.clip_idle_share
        if not self.fire(self.kind, idle, self.config.rearm_steps):
            return
        window = clip.window
        try:
            advice = recommend_threshold(list(window.values), min_samples=1)
            median, suggested = advice.median, advice.threshold
        except ValueError:  # all-zero norms: nothing to recommend
            median = suggested = 0.0
        self.report(
            (clip.first_step(row.step), row.step),
            f"clipping never acts: {clip.share(IDLE):.0%} of the last {len(window)} "
            f"steps are below {self.config.clip_idle_below:g}× the threshold {row.threshold:g}",
            {
                "idle_share": clip.share(IDLE),
                "threshold": row.threshold,
                "median_norm": median,
                "recommended_threshold": suggested,
            },
        )

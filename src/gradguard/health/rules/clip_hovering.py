"""``clip_hovering``: the norm keeps sitting at the clip threshold."""

from __future__ import annotations

from .. import _check as check
from ..base import Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..signals import CLIPPED, HOVER, ClipActivity


class ClipHovering(Rule):
    kind = "clip_hovering"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "over `clip_window` steps, >= hover_share of the norms lie within hover_band × threshold"
    )
    advice = (
        "The learning rate is likely too high: lower it or add decay.",
        "Add or lengthen warmup.",
    )
    thresholds = (
        Threshold(
            "hover_share",
            0.5,
            check.fraction,
            "share of steps in hover_band that means the norm hovers there",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.clip = context.signal(ClipActivity)

    def on_step(self, row: StepRow) -> None:
        clip, c = self.clip, self.config
        if not clip.active:
            return
        hover = clip.full and clip.share(HOVER) >= c.hover_share
        if not self.fire(self.kind, hover, c.rearm_steps):
            return
        low, high = c.hover_band
        self.report(
            (clip.first_step(row.step), row.step),
            f"gradient norm hovers at the clip threshold {row.threshold:g}: "
            f"{clip.share(HOVER):.0%} of the last {len(clip.window)} steps within "
            f"{low:g}–{high:g}× of it",
            {
                "hover_share": clip.share(HOVER),
                "threshold": row.threshold,
                "clipped_share": clip.share(CLIPPED),
            },
        )

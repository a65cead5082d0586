"""``clip_saturated``: clipping acts on almost every step, well above the threshold."""

from __future__ import annotations

import numpy as np

from .. import _check as check
from ..advice import LOWER_LR
from ..base import Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..signals import CLIPPED, HOVER, ClipActivity


class ClipSaturated(Rule):
    kind = "clip_saturated"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "over `clip_window` steps, >= clip_saturated_share of them are clipped, with norms "
        "well above the threshold (not hovering)"
    )
    advice = (
        LOWER_LR + " Clipping every step turns the optimiser into normalised SGD.",
        "Check the architecture (normalisation, residuals) and the data/loss scale.",
        "If the norms are steady and typical of a {family} model, raise the threshold "
        "(recommend_threshold()).",
    )
    thresholds = (
        Threshold(
            "clip_saturated_share",
            0.9,
            check.fraction,
            "share of clipped steps that means clipping almost always acts",
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
        saturated = clip.full and clip.share(CLIPPED) >= c.clip_saturated_share and not hover
        if not self.fire(self.kind, saturated, c.rearm_steps):
            return
        window = clip.window
        median = float(np.median(np.asarray(window.values)))
        self.report(
            (clip.first_step(row.step), row.step),
            f"clipping acts on {clip.share(CLIPPED):.0%} of the last {len(window)} "
            f"steps; median norm {median / row.threshold:.3g}× the threshold {row.threshold:g}",
            {
                "clipped_share": clip.share(CLIPPED),
                "threshold": row.threshold,
                "median_norm": median,
            },
        )

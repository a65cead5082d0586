"""``exploding``: the total norm stays far above the healthy range, or jumps and stays."""

from __future__ import annotations

from .. import _check as check
from ..advice import CLIP, LOWER_LR, RESIDUAL_NORM
from ..base import Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..signals import NormBaseline


class Exploding(Rule):
    kind = "exploding"
    severity = Severity.WARNING
    scope = "step"
    condition = (
        "total_norm > explode_above for `sustain` steps, or >= jump_factor × the rolling "
        "median for `jump_sustain` steps (an order-of-magnitude jump)"
    )
    advice = (
        CLIP,
        LOWER_LR,
        "Check the data for outliers and the loss for a wrong scale (sum instead of mean).",
        RESIDUAL_NORM,
        "For RNNs: shorter truncated-BPTT windows, LSTM/GRU, or orthogonal recurrent init.",
    )
    thresholds = (
        Threshold(
            "jump_sustain",
            3,
            check.count,
            "outliers this many steps in a row are a jump (exploding); fewer are a spike",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.baseline = context.signal(NormBaseline)

    def on_step(self, row: StepRow) -> None:
        c = self.config
        b = self.baseline
        norm = row.norm
        above = self.run("above").update(norm > c.explode_above, row.step, norm)
        jump = b.outlier and b.outliers.length >= c.jump_sustain
        sustained = above >= c.sustain
        if not self.fire(self.kind, jump or sustained, c.rearm_steps):
            return
        if sustained:
            run = self.run("above")
            message = (
                f"gradient norm above {c.explode_above:g} for {above} steps "
                f"(now {norm:.3g}; healthy up to {c.healthy_range[1]:g})"
            )
            evidence = {
                "total_norm": norm,
                "peak": run.peak,
                "steps_above": above,
                "explode_above": c.explode_above,
                "healthy_high": c.healthy_range[1],
            }
            first = run.first
        else:
            message = (
                f"gradient norm jumped {b.outliers.peak:.0f}× above its recent "
                f"median ({b.base:.3g} → {norm:.3g}) and stayed there"
            )
            evidence = {
                "total_norm": norm,
                "peak_ratio": b.outliers.peak,
                "baseline_median": b.base,
                "steps_above": b.outliers.length,
            }
            first = b.outliers.first
        self.report((first, row.step), message, evidence)

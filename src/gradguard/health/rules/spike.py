"""``spike``: a short order-of-magnitude outlier of the total norm."""

from __future__ import annotations

from ..advice import CLIP
from ..base import Context, Rule, StepRow
from ..findings import Severity
from ..signals import NormBaseline


class Spike(Rule):
    kind = "spike"
    severity = Severity.INFO
    scope = "step"
    condition = "total_norm >= jump_factor × the rolling median for fewer than `jump_sustain` steps"
    advice = (
        "Inspect the batches at these steps for corrupt or outlier samples.",
        CLIP + " Or skip outlier steps with a spike policy.",
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.baseline = context.signal(NormBaseline)

    def on_step(self, row: StepRow) -> None:
        c = self.config
        b = self.baseline
        before, first, peak = b.previous
        ended = not b.outlier and 0 < before < c.jump_sustain
        if self.fire(self.kind, ended, c.rearm_steps):
            self.report(
                (first, b.last_step),
                f"gradient norm spiked {peak:.0f}× above its recent median ({b.base:.3g}) "
                f"for {before} step(s)",
                {"peak_ratio": peak, "baseline_median": b.base, "length": before},
            )

"""``vanishing``: the total norm stays near zero."""

from __future__ import annotations

from .. import _check as check
from ..advice import ACTIVATIONS, INIT, RESIDUAL_NORM
from ..base import Rule, StepRow, Threshold
from ..findings import Severity


class Vanishing(Rule):
    kind = "vanishing"
    severity = Severity.WARNING
    scope = "step"
    condition = "total_norm < vanish_total for `sustain` steps"
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

    def on_step(self, row: StepRow) -> None:
        c = self.config
        low = self.run().update(row.norm < c.vanish_total, row.step, row.norm)
        if self.fire(self.kind, low >= c.sustain, c.rearm_steps):
            self.report(
                (self.run().first, row.step),
                f"gradient norm below {c.vanish_total:g} for {low} steps (now {row.norm:.2e})",
                {"total_norm": row.norm, "vanish_total": c.vanish_total, "steps_below": low},
            )

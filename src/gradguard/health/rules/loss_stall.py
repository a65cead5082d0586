"""``loss_stall``: the loss is flat while gradient norms stay large."""

from __future__ import annotations

import math

from .. import _check as check
from ..base import NAN, Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..windows import FlagWindow, HalvesTrend


class LossStall(Rule):
    kind = "loss_stall"
    severity = Severity.WARNING
    scope = "window"
    condition = (
        "over `stall_window` steps the loss improves by < stall_tolerance (second half vs "
        "first) while most norms exceed the healthy range"
    )
    advice = (
        "Lower the learning rate: large gradients with a flat loss mean the optimiser "
        "bounces across a valley.",
        "Add learning-rate decay.",
        "Check the labels and data for noise or a target the model cannot fit.",
    )
    thresholds = (
        Threshold(
            "stall_window",
            200,
            check.counter(4),
            "steps over which the loss trend is read (two halves compared)",
        ),
        Threshold(
            "stall_tolerance",
            0.01,
            check.positive,
            "relative loss improvement between halves below which the loss stalls",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        half = self.config.stall_window // 2
        self._loss = HalvesTrend(half)
        self._large = FlagWindow(2 * half, 1)

    def on_step(self, row: StepRow) -> None:
        c = self.config
        if not math.isfinite(row.loss):
            return
        self._loss.push(row.loss)
        self._large.push((row.norm > c.healthy_range[1],), row.norm)
        stalled = False
        old = new = improvement = NAN
        if self._loss.full:
            old, new = self._loss.means()
            improvement = (old - new) / max(abs(old), 1e-12)
            stalled = improvement < c.stall_tolerance and self._large.share(0) >= 0.5
        if self.fire(self.kind, stalled, c.rearm_steps):
            window = len(self._large)
            self.report(
                (row.step - window + 1, row.step),
                f"loss flat over {window} steps ({old:.4g} → {new:.4g}) while gradient "
                f"norms stay above {c.healthy_range[1]:g}",
                {
                    "loss_old": old,
                    "loss_new": new,
                    "improvement": improvement,
                    "large_share": self._large.share(0),
                    "healthy_high": c.healthy_range[1],
                },
            )

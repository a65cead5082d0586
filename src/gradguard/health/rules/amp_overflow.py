"""``amp_overflow``: the GradScaler keeps finding inf/NaN and backing off its scale."""

from __future__ import annotations

import math

from .. import _check as check
from ..advice import LOWER_LR
from ..base import Context, Rule, StepRow, Threshold
from ..findings import Severity
from ..windows import FlagWindow


class AmpOverflow(Rule):
    kind = "amp_overflow"
    severity = Severity.WARNING
    scope = "window"
    reads = "all"
    condition = (
        "after the first amp_warmup steps, more than amp_overflow_rate of the last "
        "amp_window steps were skipped by the GradScaler for inf/NaN (reason amp_overflow); "
        "its early calibration overflows are normal and not counted"
    )
    advice = (
        "The loss scale keeps backing off: if the hardware supports it (Ampere or newer, "
        "TPU), autocast to bfloat16, which has fp32's range and needs no GradScaler.",
        "Find the layers that produce inf in fp16: overflowing activations or attention "
        "logits (scale queries by 1/sqrt(d), keep softmax/norm layers in fp32, clamp "
        "logits); run find_nonfinite_forward(model, batch) under autocast.",
        LOWER_LR,
        "Check the GradScaler settings: a short growth_interval (default 2000) or a large "
        "growth_factor (default 2.0) makes the scale overshoot and overflow again.",
    )
    thresholds = (
        Threshold(
            "amp_overflow_rate",
            0.05,
            check.fraction,
            "share of AMP-overflow skips among the last amp_window steps above which the "
            "loss scale keeps backing off",
        ),
        Threshold(
            "amp_window", 200, check.counter(2), "steps over which AMP-overflow skips are counted"
        ),
        Threshold(
            "amp_warmup",
            100,
            check.counter(0),
            "first steps ignored (a GradScaler starts with a large scale and overflows "
            "while it calibrates)",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._window = FlagWindow(self.config.amp_window, 1)  # overflow flags, scale as value
        self._seen = 0

    def on_step(self, row: StepRow) -> None:
        c = self.config
        self._seen += 1
        if self._seen <= c.amp_warmup:
            return  # the GradScaler is still calibrating its scale
        window = self._window
        window.push((row.amp_overflow,), row.loss_scale)
        count = window.counts[0]
        # counted against the full window: a partial window fires only once its count
        # alone already exceeds the allowed share of amp_window
        active = count > c.amp_overflow_rate * c.amp_window
        if not self.fire(self.kind, active, c.rearm_steps):
            return
        seen = len(window)
        evidence = {
            "rate": count / seen,
            "overflows": count,
            "window": seen,
            "amp_overflow_rate": c.amp_overflow_rate,
        }
        message = (
            f"AMP overflow skipped {count} of the last {seen} steps ({count / seen:.1%}; "
            f"limit {c.amp_overflow_rate:.1%})"
        )
        scales = [v for v in window.values if math.isfinite(v) and v > 0.0]
        if scales:
            first, last, low = scales[0], scales[-1], min(scales)
            evidence.update(loss_scale_first=first, loss_scale_last=last, loss_scale_min=low)
            evidence["loss_scale_trend"] = last / first
            message += f"; loss scale {first:g} → {last:g} (min {low:g})"
        self.report((row.step - seen + 1, row.step), message, evidence)

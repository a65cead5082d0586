"""``loss_scale_collapse``: the AMP loss scale has fallen below 1 and gradients underflow."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity


class LossScaleCollapse(Rule):
    kind = "loss_scale_collapse"
    severity = Severity.CRITICAL
    scope = "window"
    amp_rows = True
    condition = (
        "the recorded loss_scale is below collapse_below; the episode starts where the "
        "scale began its uninterrupted fall"
    )
    advice = (
        "Something overflows fp16 on every step (an activation, a logit, a loss term), so "
        "the GradScaler halves its scale each step: find it with find_nonfinite_forward("
        "model, batch) under autocast and keep that op in fp32, or autocast to bfloat16.",
        "Check the data of the steps where it began for huge values.",
        "Restart from a checkpoint taken before the collapse: with the scale this low the "
        "gradients underflow and the model no longer learns.",
    )
    thresholds = (
        Threshold(
            "collapse_below",
            1.0,
            check.positive,
            "a loss scale below this no longer protects fp16 gradients from underflow",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.tracker = Tracker(self.kind, 1, self.config.rearm_steps)
        self._previous = math.nan  # the scale at the previous recorded step
        self._fall_start = 0  # the step the current fall began at
        self._fall_from = math.nan
        self._was_falling = False
        # overflow steps of earlier batches since the current fall began: an episode that
        # opens in this batch counts them when its fall began in an earlier one
        self._overflows_before = np.empty(0, dtype=np.int64)

    def on_steps(self, steps: Steps) -> None:
        scale = steps.loss_scale
        known = np.isfinite(scale)
        if not known.any():  # no fall can begin or end here; its overflows still count
            overflows = steps.step[steps.amp_overflow]
            self._overflows_before = np.concatenate([self._overflows_before, overflows])
            return
        rows = np.flatnonzero(known)
        values, at = scale[rows], steps.step[rows]
        previous = np.concatenate([[self._previous], values[:-1]])
        falling = values < previous
        # a fall begins at the step before the first lower scale
        begins = falling & ~np.concatenate([[self._was_falling], falling[:-1]])
        begin_at = np.where(begins, np.concatenate([[at[0] - 1], at[:-1]]), -1)
        begin_from = np.where(begins, previous, np.nan)
        index = np.maximum.accumulate(np.where(begins, np.arange(len(rows)), -1))
        start = np.where(index >= 0, begin_at[np.maximum(index, 0)], self._fall_start)
        origin = np.where(index >= 0, begin_from[np.maximum(index, 0)], self._fall_from)
        self._was_falling = bool(falling[-1])
        self._previous = float(values[-1])
        self._fall_start, self._fall_from = int(start[-1]), float(origin[-1])
        low = values < self.config.collapse_below
        before = self._overflows_before
        overflow_steps = np.concatenate([before, steps.step[steps.amp_overflow]])
        self._overflows_before = overflow_steps[overflow_steps >= self._fall_start]
        for change in self.updated(self.tracker.feed(at, low, start)[0]):
            episode = change.episode
            s = episode.stats
            s.setdefault("from", float(origin[change.lo]))
            s["min"] = min(s.get("min", math.inf), float(values[change.lo : change.hi + 1].min()))
            span = (steps.step >= episode.first) & (steps.step <= episode.last)
            if "overflows" not in s:  # those before this batch, since its fall began
                s["overflows"] = int((before >= episode.first).sum())
            s["overflows"] += int((steps.amp_overflow & span).sum())
            self.report(
                episode,
                f"loss scale collapsed to {s['min']:.3g} (from {s['from']:g} at step "
                f"{episode.first}; {s['overflows']} overflow skips): fp16 gradients underflow "
                "and the model has stopped learning",
                {
                    "loss_scale_from": s["from"],
                    "loss_scale_min": s["min"],
                    "overflows": s["overflows"],
                },
            )

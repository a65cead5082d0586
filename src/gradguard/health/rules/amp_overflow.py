"""``amp_overflow``: the GradScaler keeps finding inf/NaN and backing off its scale."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..advice import LOWER_LR
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..windows import Counts


class AmpOverflow(Rule):
    kind = "amp_overflow"
    severity = Severity.WARNING
    scope = "window"
    amp_rows = True
    condition = (
        "more than amp_overflow_rate of the last amp_window steps were skipped by the "
        "GradScaler for inf/NaN (reason amp_overflow); the overflows of its calibration (the "
        "run of them that opens the run, while the initial scale backs off) are not counted"
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
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        c = self.config
        self.tracker = Tracker(self.kind, 1, c.rearm_steps)
        self._counts = Counts(c.amp_window, 1)
        # the last amp_window rows (steps, loss scales, overflows counted) while one of
        # them overflowed: an episode that opens in this batch may have begun in them
        self._tail_steps = np.empty(0, dtype=np.int64)
        self._tail_scales = np.empty(0)
        self._tail_overflow = np.empty(0, dtype=bool)
        self._seen = 0  # overflows counted so far (the calibration's are not)
        # the lowest loss scale of the rows after the open episode's last: a flush with no
        # active row in it is not one of its changes, yet lies within it once it goes on
        self._gap_min = math.inf
        self._calibrating = True

    def _with_tail(
        self, steps: Steps, overflow: np.ndarray
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """The kept rows' count, then their steps, loss scales and overflows followed by
        the batch's; keeps the last amp_window of these rows if one of them overflowed."""
        past = len(self._tail_steps)
        at, scale_at, flags = steps.step, steps.loss_scale, overflow
        if past:
            at = np.concatenate([self._tail_steps, at])
            scale_at = np.concatenate([self._tail_scales, scale_at])
            flags = np.concatenate([self._tail_overflow, flags])
        start = max(len(at) - self.config.amp_window, 0)
        if not flags[start:].any():
            start = len(at)
        self._tail_steps, self._tail_scales = at[start:], scale_at[start:]
        self._tail_overflow = flags[start:]
        return past, at, scale_at, flags

    def _first_overflows(self, past: int, at: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Per row of the batch (which starts at ``past`` in ``at``), the step of the first
        overflow in the amp_window rows ending at it (a row with none is never active)."""
        rows = np.arange(past, len(at))
        hits = np.flatnonzero(flags)
        if not len(hits):
            return np.full(len(rows), np.inf)
        pick = np.searchsorted(hits, rows - self.config.amp_window + 1)
        return at[hits[np.minimum(pick, len(hits) - 1)]].astype(np.float64)

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        overflow = steps.amp_overflow.copy()
        if self._calibrating and len(steps):
            clear = np.flatnonzero(~overflow)
            end = int(clear[0]) if len(clear) else len(steps)
            overflow[:end] = False  # the GradScaler calibrating its initial scale
            self._calibrating = not len(clear)
        counts, _ = self._counts.push(overflow[:, None])
        count = counts[:, 0]
        # the episode runs from the first to the last overflow while the rate is too high
        active = (count > c.amp_overflow_rate * c.amp_window) & overflow
        past, at, scale_at, flags = self._with_tail(steps, overflow)
        first = self._first_overflows(past, at, flags)
        seen = self._seen + np.cumsum(overflow)  # overflows counted through each row
        self._seen = int(seen[-1]) if len(seen) else self._seen
        last = -1  # the open episode's last row in this flush
        for change in self.updated(self.tracker.feed(steps.step, active, first)[0]):
            episode = change.episode
            rows = slice(change.lo, change.hi + 1)
            s = episode.stats
            gap = math.inf
            if "seen_before" not in s:  # every overflow in the window that opened it is its own
                s["seen_before"] = int(seen[change.lo]) - int(count[change.lo])
                before = slice(None, past + change.lo)  # rows before the one that opened it
                scales = scale_at[before][at[before] >= episode.first]
                scales = scales[np.isfinite(scales) & (scales > 0)]
                if len(scales):
                    s["scale_first"] = float(scales[0])
            else:  # the rows since its last one, here and in flushes with no active row
                gap = min(self._gap_min, _lowest(steps.loss_scale[: change.lo]))
            s["overflows"] = int(seen[change.hi]) - s["seen_before"]
            scales = steps.loss_scale[rows]
            scales = scales[np.isfinite(scales) & (scales > 0)]
            if len(scales):
                s.setdefault("scale_first", float(scales[0]))
                s["scale_last"] = float(scales[-1])
                s["scale_min"] = min(s.get("scale_min", math.inf), float(scales.min()), gap)
            if episode is self.tracker.episode:
                last = change.hi
            window = int(count[change.hi])
            evidence = {
                "overflows": s["overflows"],
                "window_overflows": window,
                "window": c.amp_window,
                "rate": window / c.amp_window,
                "amp_overflow_rate": c.amp_overflow_rate,
            }
            message = (
                f"AMP overflow skipped {s['overflows']} steps ({episode.first}–{episode.last}); "
                f"up to {window} of {c.amp_window} ({window / c.amp_window:.1%}; limit "
                f"{c.amp_overflow_rate:.1%})"
            )
            if "scale_last" in s:
                evidence.update(
                    loss_scale_first=s["scale_first"],
                    loss_scale_last=s["scale_last"],
                    loss_scale_min=s["scale_min"],
                )
                message += f"; loss scale {s['scale_first']:g} → {s['scale_last']:g}"
            self.report(episode, message, evidence)
        if self.tracker.episode is None:
            self._gap_min = math.inf
        else:
            since = self._gap_min if last < 0 else math.inf
            self._gap_min = min(since, _lowest(steps.loss_scale[last + 1 :]))


def _lowest(scales: np.ndarray) -> float:
    """The lowest finite positive loss scale of ``scales`` (``inf``: none)."""
    scales = scales[np.isfinite(scales) & (scales > 0)]
    return float(scales.min()) if len(scales) else math.inf

"""``lr_change``: a learning-rate rise followed by an exploding norm or a rising loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend, NormBaseline
from ..windows import Rolling, last_finite


class LRChange(Rule):
    kind = "lr_change"
    severity = Severity.WARNING
    scope = "step"
    condition = (
        "the recorded lr rises to >= lr_rise × its minimum over the previous lr_lookback "
        "steps and above every lr the run has trained at (a warm restart back to an lr "
        "already used is the schedule's), and within lr_window steps the smoothed loss "
        "reaches >= divergence_factor × its level before the rise, or the total norm >= "
        "jump_factor × its median before the rise while the loss is no better than before "
        "it, for `jump_sustain` steps; the episode starts at the rise and lasts while the lr "
        "stays raised and the run is worse than before it (smoothed loss above its level "
        "before, or norm above sqrt(jump_factor) × its median before)"
    )
    advice = (
        "Undo or shrink the learning-rate change: check the scheduler (a restart, a "
        "warmup peak or a step that multiplies instead of divides) and any manual "
        "param_group['lr'] edits.",
        "Warm the new learning rate up over a few hundred steps instead of jumping to it.",
        "Clip the gradient norm so one large update cannot wreck the weights.",
    )
    thresholds = (
        Threshold(
            "lr_rise",
            3.0,
            check.greater_than_one,
            "a learning rate this many times its recent minimum is a rise worth watching",
        ),
        Threshold(
            "lr_lookback",
            10,
            check.count,
            "steps before a rise its minimum is taken over: a rise is a change, not a schedule",
        ),
        Threshold(
            "lr_window", 100, check.count, "steps after a rise within which harm is its doing"
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        c = self.config
        self.norms = context.signal(NormBaseline)
        self.loss = context.signal(LossTrend)
        self.tracker = Tracker(self.kind, c.jump_sustain, c.rearm_steps)
        self._lr = Rolling(c.lr_lookback)
        self._rise: dict[str, Any] | None = None
        self._loss_level = math.nan  # the latest smoothed loss before the current row
        self._peak = -math.inf  # the highest lr recorded so far

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        n = len(steps)
        lr = steps.lr
        known = np.isfinite(lr) & (lr > 0)
        low, seen = self._lr.push(lr[known], "min")
        trailing = np.full(n, np.nan)
        trailing[known] = np.where(seen > 0, low if len(low) else np.nan, np.nan)
        peaks = np.maximum.accumulate(np.concatenate([[self._peak], np.where(known, lr, -np.inf)]))
        self._peak = float(peaks[-1])
        with np.errstate(invalid="ignore"):
            rises = known & (lr >= c.lr_rise * trailing) & (lr > peaks[:-1])
        loss_median = self.loss.median
        before = last_finite(loss_median, self._loss_level, include=False)
        i = 0
        while i < n:
            if self._rise is None:
                found = np.flatnonzero(rises[i:])
                if not len(found):
                    break
                i += int(found[0])
                self._rise = {
                    "step": int(steps.step[i]),
                    "lr_before": float(trailing[i]),
                    "lr_after": float(lr[i]),
                    "norm_before": _norm_before(self.norms, steps.norm, i),
                    # before the loss window fills, the run's first loss stands in
                    "loss_before": float(before[i])
                    if np.isfinite(before[i])
                    else self.loss.first_loss,
                }
            rise = self._rise
            end = n
            if not self.tracker.is_open:  # harm must follow within lr_window steps
                late = np.flatnonzero(steps.step[i:] > rise["step"] + c.lr_window)
                end = i + int(late[0]) if len(late) else n
            rows = slice(i, end)
            norm, loss = steps.norm[rows], loss_median[rows]
            with np.errstate(invalid="ignore"):
                if self.tracker.is_open:
                    harm = (lr[rows] >= c.lr_rise * rise["lr_before"]) & (
                        (loss > rise["loss_before"])
                        | (norm >= math.sqrt(c.jump_factor) * rise["norm_before"])
                    )
                else:  # a norm that grows while the loss falls is a warmup doing its job
                    not_better = ~(loss < rise["loss_before"])
                    harm = ((norm >= c.jump_factor * rise["norm_before"]) & not_better) | (
                        loss >= c.divergence_factor * rise["loss_before"]
                    )
            starts = np.full(end - i, rise["step"])
            changes, used = self.tracker.feed(steps.step[rows], harm, starts, stop=True)
            for change in self.updated(changes):
                self._update(change.episode, steps, i + change.lo, i + change.hi)
                self._report(change.episode)
            i += used
            if self.tracker.is_open:
                continue
            if any(not change.episode.open for change in changes):
                self._rise = None  # the harm ended
            elif i >= end and end < n:
                self._rise = None  # no harm within lr_window steps: a benign rise (warmup)
                self.tracker.run = 0
        finite = loss_median[np.isfinite(loss_median)]
        if len(finite):
            self._loss_level = float(finite[-1])

    def _update(self, episode, steps: Steps, lo: int, hi: int) -> None:
        s = episode.stats
        rise = self._rise or {}
        for key, value in rise.items():
            s.setdefault(key, value)
        rows = slice(lo, hi + 1)
        lr = steps.lr[rows]
        if np.isfinite(lr).any():
            s["lr_after"] = max(s["lr_after"], float(np.nanmax(lr)))
        s["norm_peak"] = max(
            s.get("norm_peak", 0.0), float(np.nanmax(steps.norm[rows], initial=0.0))
        )
        losses = self.loss.median[rows]
        if np.isfinite(losses).any():
            s["loss_after"] = float(losses[np.isfinite(losses)][-1])

    def _report(self, episode) -> None:
        s = episode.stats
        ratio = s["lr_after"] / s["lr_before"]
        message = (
            f"learning rate raised {ratio:.3g}× at step {s['step']} "
            f"({s['lr_before']:.3g} → {s['lr_after']:.3g})"
        )
        harms = []
        if s["norm_before"] > 0 and s["norm_peak"] >= self.config.jump_factor * s["norm_before"]:
            harms.append(
                f"gradient norm ×{s['norm_peak'] / s['norm_before']:.3g} since "
                f"({s['norm_before']:.3g} → peak {s['norm_peak']:.3g})"
            )
        if math.isfinite(s.get("loss_after", math.nan)) and math.isfinite(s["loss_before"]):
            harms.append(f"loss {s['loss_before']:.4g} → {s['loss_after']:.4g}")
        message += "; " + ", ".join(harms) if harms else ""
        evidence = {
            "lr_before": s["lr_before"],
            "lr_after": s["lr_after"],
            "lr_ratio": ratio,
            "norm_before": s["norm_before"],
            "norm_peak": s["norm_peak"],
            "loss_before": s["loss_before"],
            "loss_after": s.get("loss_after", math.nan),
        }
        self.report(episode, message, evidence, origin="lr")


def _norm_before(baseline: NormBaseline, norm: np.ndarray, row: int) -> float:
    level = baseline.level[row]
    if np.isfinite(level):
        return float(10.0**level)
    return float(norm[row])  # the run's first step: nothing before it

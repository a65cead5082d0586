"""``run_lost``: the verdict that a run cannot recover by itself, and since when."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import LossTrend


class RunLost(Rule):
    kind = "run_lost"
    severity = Severity.CRITICAL
    scope = "run"
    condition = (
        "weights: a non-finite gradient was applied (the step was not skipped) and the next "
        "steps are non-finite too (`lost_confirm` in a row); or loss: the smoothed loss has "
        "stayed at least divergence_factor × its best (and beyond its noise, as for "
        "loss_divergence) and above its initial level for `lost_after` steps"
    )
    advice = (
        "Restore the last good checkpoint: this run will not recover on its own.",
        "Keep non-finite updates out of the weights: put gradguard.SkipNonFinite() in the "
        "policy (the default does).",
        "Lower the learning rate or add warmup, and clip the gradient norm.",
        "Read the findings that precede this one for the cause (learning-rate change, "
        "exploding norm, non-finite origin).",
    )
    thresholds = (
        Threshold(
            "lost_confirm",
            3,
            check.count,
            "non-finite steps in a row, the first applied to the weights, that prove the "
            "weights non-finite",
        ),
        Threshold(
            "lost_after",
            50,
            check.count,
            "steps a diverged loss must stay above its initial level before the run is lost",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        c = self.config
        self.loss = context.signal(LossTrend)
        self.weights = Tracker(self.kind, c.lost_confirm, c.rearm_steps, scope="weights")
        self.diverged = Tracker(self.kind, c.lost_after, c.rearm_steps, scope="loss")
        self._applied = False  # a non-finite gradient reached the weights in this streak
        self._prev_bad = False

    def _lost_streak(self, bad: np.ndarray, applied: np.ndarray) -> np.ndarray:
        """Rows of a non-finite streak from its first step that was applied (not skipped)."""
        n = len(bad)
        if not n:
            return bad
        if not bad.any():  # no streak in this batch: any earlier one has ended
            self._applied = self._prev_bad = False
            return bad
        index = np.arange(n)
        starts = bad & ~np.concatenate([[self._prev_bad], bad[:-1]])
        run_start = np.maximum.accumulate(np.where(starts | ~bad, index, -1))
        last_applied = np.maximum.accumulate(np.where(applied, index, -1))
        continuing = run_start < 0  # rows of a streak that began in an earlier batch
        lost = bad & (
            ((last_applied >= run_start) & ~continuing)
            | (continuing & ((last_applied >= 0) | self._applied))
        )
        self._applied = bool(bad[-1] and lost[-1])
        self._prev_bad = bool(bad[-1])
        return lost

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        bad = ~steps.finite
        lost = self._lost_streak(bad, bad & ~steps.skipped)
        for change in self.updated(self.weights.feed(steps.step, lost)[0]):
            episode = change.episode
            before = episode.stats.get("count", self.weights.sustain - 1)
            episode.stats["count"] = before + int(lost[change.lo : change.hi + 1].sum())
            self.report(
                episode,
                f"run lost at step {episode.first}: a non-finite gradient was applied (the "
                "step was not skipped), so the weights are no longer finite; "
                f"{episode.stats['count']} non-finite steps since",
                {"nonfinite_steps": episode.stats["count"]},
            )
        m, best, initial = self.loss.median, self.loss.best, self.loss.initial
        with np.errstate(invalid="ignore"):
            gone = (m >= c.divergence_factor * best) & (m > initial) & (best > 0)
        gone &= self.loss.beyond_noise(c.divergence_factor, c.divergence_z)
        for change in self.updated(self.diverged.feed(steps.step, gone)[0]):
            episode = change.episode
            rows = slice(change.lo, change.hi + 1)
            stats = episode.stats
            now = m[rows][np.isfinite(m[rows])]
            if len(now):
                stats["now"] = float(now[-1])
            stats.setdefault("best", float(best[change.lo]))
            stats.setdefault("initial", float(initial[change.lo]))
            self.report(
                episode,
                f"run lost at step {episode.first}: the loss diverged (best {stats['best']:.4g}, "
                f"now {stats.get('now', math.nan):.4g}, above its initial {stats['initial']:.4g}) "
                f"and has not come back for {episode.last - episode.first + 1} steps",
                {
                    "loss_best": stats["best"],
                    "loss_now": stats.get("now", math.nan),
                    "loss_initial": stats["initial"],
                },
            )

"""``exploding``: the total norm jumps an order of magnitude and stays there, or grows far
beyond the run's first steps."""

from __future__ import annotations

import math

import numpy as np

from .. import _check as check
from ..advice import CLIP, LOWER_LR, RESIDUAL_NORM
from ..base import Context, Rule, Steps, Threshold
from ..episodes import Tracker
from ..findings import Severity
from ..signals import NormBaseline

_JUMP, _GROWTH, _ABOVE = "jump", "growth", "above"


#: for growth from the first steps, which no detector with a past can catch in time
_FROM_THE_START = (
    "Unstable from the first steps: a fixed clip near the first healthy norms (`gradguard "
    "diagnose` suggests one), or `gg.Rewind` (returns to the last good state and tightens). "
    "Under SGD the default policy caps, from step one, a step that is too big for the "
    "weights and overshoots the loss, if it is given the loss (`guard.step(optimizer, "
    "loss=loss)`); under other optimizers it has no past to judge such a run by."
)


#: for a norm far above the limit from the first step that does not grow
_SCALE = (
    "Large from the start: standardise regression targets (and inputs), and average the "
    "loss over the batch rather than summing it; then see whether the norm still needs a clip."
)


class Exploding(Rule):
    kind = "exploding"
    severity = Severity.WARNING
    scope = "step"
    condition = (
        "for `jump_sustain` steps in a row the total norm is an outlier (>= jump_factor × its "
        "rolling median, itself above vanish_total), or above explode_above and >= "
        "jump_factor × the run's first norm, or above 10 × explode_above; the episode lasts "
        "while the norm "
        "stays above sqrt(jump_factor) × the level it jumped from (or above 10 × explode_above) "
        "and ends after `rearm_steps` steps below"
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
            "outlier steps in a row that make a jump (exploding); fewer make a spike",
        ),
    )

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        c = self.config
        self.baseline = context.signal(NormBaseline)
        self.tracker = Tracker(self.kind, c.jump_sustain, c.rearm_steps)
        self._base = math.nan
        self._why = _JUMP

    def on_steps(self, steps: Steps) -> None:
        c = self.config
        b = self.baseline
        norm = steps.norm
        finite = np.isfinite(norm)  # a non-finite norm is the nonfinite rule's
        huge = finite & (norm > 10.0 * c.explode_above)
        with np.errstate(invalid="ignore"):
            grown = finite & (norm > c.explode_above) & (norm >= c.jump_factor * 10.0**b.early)
        i = 0
        while i < len(steps):
            rows = slice(i, None)
            if self.tracker.is_open:
                with np.errstate(invalid="ignore"):
                    active = (norm[rows] >= math.sqrt(c.jump_factor) * self._base) | huge[rows]
            else:  # a jump from vanishing norms is a recovery, not an explosion
                with np.errstate(invalid="ignore"):
                    jump = b.outlier[rows] & (10.0 ** b.median[rows] >= c.vanish_total)
                active = jump | grown[rows] | huge[rows]
            changes, used = self.tracker.feed(steps.step[rows], active, stop=True)
            for change in self.updated(changes):
                lo, hi = change.lo + i, change.hi + i
                episode = change.episode
                if "base" not in episode.stats:
                    self._open(episode, lo, norm, b, huge, grown)
                span = norm[lo : hi + 1]
                episode.stats["peak"] = max(
                    episode.stats.get("peak", 0.0),
                    float(np.max(span[np.isfinite(span)], initial=0.0)),
                )
                if steps.lr.size and np.isfinite(steps.lr[hi]):
                    episode.stats["lr"] = float(steps.lr[hi])
                self._report(episode)
            i += used

    def _open(self, episode, row, norm, b, huge, grown) -> None:
        c = self.config
        if b.outlier[row]:
            why, base = _JUMP, float(norm[row] / b.ratio[row])
        elif grown[row]:
            why, base = _GROWTH, float(10.0 ** b.early[row])
        else:
            why, base = _ABOVE, 10.0 * c.explode_above / math.sqrt(c.jump_factor)
            if episode.first <= self.context.first_step:  # from the run's first step on
                episode.stats["first"] = b.first()
        self._why, self._base = why, base
        episode.stats.update(base=base, why=why)

    def _report(self, episode) -> None:
        c = self.config
        s = episode.stats
        peak, base = s["peak"], s["base"]
        family = c.family_row.label
        # far above the limit from the first step, and not growing: a scale, not a fault
        from_start = s["why"] == _ABOVE and s.get("first", math.nan) * c.jump_factor > peak
        if s["why"] == _JUMP:
            message = (
                f"gradient norm jumped to {peak / base:.3g}× its recent median "
                f"({base:.3g} → peak {peak:.3g})"
            )
        elif s["why"] == _GROWTH:
            message = (
                f"gradient norm grew {peak / base:.3g}× from the run's first steps "
                f"({base:.3g} → peak {peak:.3g}), above the {family} explosion limit "
                f"{c.explode_above:g}"
            )
        elif from_start:
            message = (
                f"gradient norm far above the {family} explosion limit {c.explode_above:g} "
                f"from the first step on (first {s['first']:.3g}, peak {peak:.3g}): large "
                "from the start rather than growing, which points at the scale of the loss "
                "or the targets before the learning rate"
            )
        else:
            message = (
                f"gradient norm far above the {family} explosion limit {c.explode_above:g} "
                f"(peak {peak:.3g})"
            )
        evidence = {
            "baseline": base,
            "peak": peak,
            "peak_ratio": peak / base if base > 0 else math.inf,
            "explode_above": c.explode_above,
        }
        if "lr" in s:
            evidence["lr"] = s["lr"]
        extra = (_FROM_THE_START,) if s["why"] == _GROWTH else (_SCALE,) if from_start else ()
        self.report(episode, message, evidence, extra_advice=extra)

"""Policies that skip a step outright: non-finite gradients and norm spikes."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .. import _validate as check
from ..ops import Array, Ops
from ..schema import SkipReason
from .base import Decision, Policy, StepInputs, finite_or

_NONFINITE, _POLICY = int(SkipReason.NONFINITE), int(SkipReason.POLICY)


class SkipNonFinite(Policy):
    """Skip the step when any gradient holds NaN or inf (or the total norm overflows).

    The guard then leaves parameters and optimizer state exactly as they were, and the
    offending parameter names can be read from the step's statistics.
    """

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        total = inputs.total_norm
        return Decision(
            skip=xp.logical_not(xp.isfinite(total)), reason=xp.code(_NONFINITE, total)
        ), state


class SkipSpikeState(NamedTuple):
    """The last ``window`` finite norms (NaN where empty) and the number of steps seen."""

    window: Array
    count: Any


class SkipSpike(Policy):
    """Skip a step whose global norm exceeds ``mean + sigma · std`` of a rolling window.

    After the skip-step optimizers of OLMo 2 (Team OLMo, 2025), which skip at 6σ over a
    window of 128. The window holds the last ``window`` finite norms, skipped ones
    included but clipped to the limit: leaving skips out would deadlock on a lasting
    change of gradient scale (every later step looks like a spike), while letting them
    in raw would blind the rule for a whole window after one spike, and spikes come in
    clusters. Measured with window 32: a lasting 5x jump is accepted after 7 skipped
    steps, a 100x jump after 16. No step is skipped until ``min_history`` norms
    (default ``max(20, window // 2)``) are in.
    """

    State = SkipSpikeState

    def __init__(
        self, sigma: float = 6.0, window: int = 128, min_history: int | None = None
    ) -> None:
        self.sigma = check.positive("sigma", sigma, float32=True)
        self.window = check.positive_int("window", window, minimum=2)
        default = max(min(20, self.window), self.window // 2)
        self.min_history = (
            default if min_history is None else check.positive_int("min_history", min_history)
        )
        if self.min_history > self.window:
            raise ValueError(
                f"min_history must be <= window ({self.window}), got {self.min_history}"
            )

    def _config(self):
        return {"sigma": self.sigma, "window": self.window, "min_history": self.min_history}

    def init(self, inputs: StepInputs, xp: Ops) -> SkipSpikeState:
        return SkipSpikeState(xp.full(self.window, math.nan, inputs.total_norm), xp.counter(0))

    def update(
        self, state: SkipSpikeState, inputs: StepInputs, xp: Ops
    ) -> tuple[Decision, SkipSpikeState]:
        g = inputs.total_norm
        history = state.window
        valid = ~xp.isnan(history)
        n = xp.f32(xp.sum(valid))
        mean = xp.sum(xp.where(valid, history, 0.0)) / xp.maximum(n, 1.0)
        deviation = history - mean
        var = xp.sum(xp.where(valid, deviation * deviation, 0.0)) / xp.maximum(n, 1.0)
        limit = mean + self.sigma * xp.sqrt(var)
        spike = (n >= self.min_history) & xp.isfinite(g) & (g > limit)
        entry = finite_or(xp, xp.where(spike, limit, g), math.nan)
        window = xp.set_at(history, state.count % self.window, entry)
        decision = Decision(skip=spike, reason=xp.code(_POLICY, g))
        return decision, SkipSpikeState(window, state.count + 1)

"""Policies that skip a step outright: non-finite gradients and norm spikes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _validate as check
from ..schema import SkipReason
from ..stats import GradStats
from .base import Decision, Policy, finite_or, reason_tensor, require_grads


class SkipNonFinite(Policy):
    """Skip the step when any gradient holds NaN or inf (or the total norm overflows).

    The guard then leaves parameters and optimizer state exactly as they were, and the
    offending parameter names can be read from the step's statistics.
    """

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        bad = stats.any_nonfinite
        return Decision(skip=bad, reason=reason_tensor(SkipReason.NONFINITE, bad))


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

    _state_names = ("_window", "_count")

    def __init__(
        self, sigma: float = 6.0, window: int = 128, min_history: int | None = None
    ) -> None:
        self.sigma = check.positive("sigma", sigma)
        self.window = check.positive_int("window", window, minimum=2)
        default = max(min(20, self.window), self.window // 2)
        self.min_history = (
            default if min_history is None else check.positive_int("min_history", min_history)
        )
        if self.min_history > self.window:
            raise ValueError(
                f"min_history must be <= window ({self.window}), got {self.min_history}"
            )
        self._window: Tensor | None = None
        self._count = 0

    def _config(self):
        return {"sigma": self.sigma, "window": self.window, "min_history": self.min_history}

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        g = stats.total_norm.float()
        if self._window is None:
            self._window = torch.full((self.window,), math.nan, device=g.device)
        history = self._window
        valid = ~torch.isnan(history)
        n = valid.sum()
        mean = torch.where(valid, history, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (history - mean) ** 2, 0.0).sum() / n.clamp(min=1)
        limit = mean + self.sigma * var.sqrt()
        spike = (n >= self.min_history) & torch.isfinite(g) & (g > limit)
        entry = torch.where(spike, limit, g)
        history[self._count % self.window] = finite_or(entry, torch.full_like(g, math.nan))
        self._count += 1
        return Decision(skip=spike, reason=reason_tensor(SkipReason.POLICY, g))

"""Clipping whose threshold follows the run: AutoClip, ZClip and a per-tensor EMA clip.

State is kept on the gradients' device and updated with ``torch.where`` so no step
needs a host sync, and a NaN or inf norm never enters a history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _validate as check
from ..functional import clip_coefficient
from ..stats import GradStats
from . import _histogram
from .base import Decision, Policy, finite_or, require_grads


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)


class AutoClip(Policy):
    """Clip at the ``percentile``-th percentile of the gradient norms seen so far.

    Seetharaman, Wichern, Pardo and Le Roux (2020), "AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks": append this step's norm to the history,
    then clip the global norm at ``percentile(history, p)`` (linear interpolation,
    like ``numpy.percentile``). ``history=None`` keeps every past norm: exactly for the
    first ``exact_until`` steps, then as counts in 4000 log-spaced bins (percentiles
    within ~1% of exact, constant time and memory per step however long the run); an
    int keeps an exact sliding window of that many steps. Non-finite norms are left out.

    The paper's p=10 starves plain SGD on long-range RNN tasks in our measurements;
    prefer a higher percentile there.
    """

    _state_names = ("_buffer", "_count", "_bins")

    def __init__(
        self, percentile: float = 10.0, history: int | None = None, exact_until: int = 4096
    ) -> None:
        self.percentile = check.in_range("percentile", percentile, 0.0, 100.0)
        self.history = None if history is None else check.positive_int("history", history)
        self.exact_until = check.positive_int("exact_until", exact_until)
        self._buffer: Tensor | None = None
        self._bins: Tensor | None = None  # log-binned counts once past exact_until
        self._count = 0

    def _config(self):
        return {"percentile": self.percentile, "history": self.history}

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        total = stats.total_norm.float()
        value = finite_or(total, _scalar(math.nan, total))
        if self.history is None and self._count >= self.exact_until:
            threshold = self._binned(value)
            return Decision(scale=clip_coefficient(threshold, total), threshold=threshold)
        if self.history is None:
            capacity = min(1024, self.exact_until) if self._buffer is None else self._buffer.numel()
            while capacity <= self._count:
                capacity = min(capacity * 2, self.exact_until)
            slot = self._count
        else:
            capacity = self.history
            slot = self._count % self.history
        self._ensure_buffer(capacity, total)
        assert self._buffer is not None
        self._buffer[slot] = value
        self._count += 1
        filled = self._buffer[: min(self._count, capacity)]
        threshold = torch.nanquantile(filled, self.percentile / 100.0)
        threshold = torch.where(torch.isnan(threshold), _scalar(math.inf, total), threshold)
        return Decision(scale=clip_coefficient(threshold, total), threshold=threshold)

    def _binned(self, value: Tensor) -> Tensor:
        if self._bins is None:  # switch from the exact history to bin counts, once
            assert self._buffer is not None
            self._bins = _histogram.add_(_histogram.empty(value.device), self._buffer)
            self._buffer = None
        _histogram.add_(self._bins, value)
        self._count += 1
        threshold = _histogram.quantile(self._bins, self.percentile / 100.0)
        return torch.where(torch.isnan(threshold), _scalar(math.inf, value), threshold)

    def _ensure_buffer(self, capacity: int, like: Tensor) -> None:
        old = self._buffer
        if old is not None and old.numel() == capacity and old.device == like.device:
            return
        buffer = torch.full((capacity,), math.nan, dtype=torch.float32, device=like.device)
        if old is not None:
            keep = min(old.numel(), capacity)
            buffer[:keep] = old[:keep].to(like.device)
        self._buffer = buffer


class ZClip(Policy):
    """Clip only gradient-norm spikes, judged by a z-score against EMA statistics.

    Kumar, Owen, Chowdhury and Güra (2025), "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training". The first ``warmup_steps`` finite norms initialise the mean and
    variance; afterwards, with ``z = (g − μ) / (σ + eps)``, a step with ``z > z_thresh``
    is clipped to ``μ + z_thresh² · σ / z`` (the paper's adaptive scaling: the larger
    the outlier, the harder the clip), and the EMAs are updated with the clipped norm:
    ``μ ← αμ + (1−α)g'``, ``σ² ← ασ² + (1−α)(g' − μ)²``.

    Additions for safety: ``max_norm`` is a permanent hard cap (the reference's
    ``max_grad_norm``); ``warmup_max_norm`` caps only the unclipped warm-up, during
    which a diverging run can otherwise blow up before ZClip has statistics. The
    warm-up statistics are taken from the capped norms, the ones actually applied:
    built from raw norms, a run that diverges during warm-up starts with a huge mean
    and is never clipped back (measured in ``benchmarks/efficacy``: 50–1000× lower
    final error on exploding SGD runs).
    """

    _state_names = ("_sum", "_sumsq", "_n", "_mean", "_var")

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        warmup_max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = check.in_open_unit("alpha", alpha)
        self.z_thresh = check.positive("z_thresh", z_thresh)
        self.warmup_steps = check.positive_int("warmup_steps", warmup_steps)
        self.max_norm = None if max_norm is None else check.non_negative("max_norm", max_norm)
        self.warmup_max_norm = (
            None
            if warmup_max_norm is None
            else check.non_negative("warmup_max_norm", warmup_max_norm)
        )
        self.eps = check.positive("eps", eps)
        self._sum = self._sumsq = self._n = self._mean = self._var = None

    def _config(self):
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
            "warmup_max_norm": self.warmup_max_norm,
        }

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        g = stats.total_norm.float()
        if self._n is None:
            zero = _scalar(0.0, g)
            self._sum, self._sumsq, self._n, self._mean, self._var = (zero.clone() for _ in "12345")
        finite = torch.isfinite(g)
        g0 = torch.where(finite, g, 0.0)
        ready = self._n >= self.warmup_steps  # statistics existed before this step

        # Warm-up: accumulate finite norms; initialise the EMAs once enough are in.
        collect = finite & ~ready
        applied = g0 if self.warmup_max_norm is None else g0.clamp(max=self.warmup_max_norm)
        self._sum = self._sum + torch.where(collect, applied, 0.0)
        self._sumsq = self._sumsq + torch.where(collect, applied * applied, 0.0)
        self._n = self._n + collect.float()
        now_ready = ~ready & (self._n >= self.warmup_steps)
        first_mean = self._sum / self._n.clamp(min=1.0)
        first_var = (self._sumsq / self._n.clamp(min=1.0) - first_mean**2).clamp(min=0.0)

        # Spike test against the statistics from before this step.
        std = self._var.sqrt()
        z = (g0 - self._mean) / (std + self.eps)
        spike = ready & finite & (z > self.z_thresh)
        clipped_to = self._mean + self.z_thresh**2 * std / z.clamp(min=self.eps)
        scale = torch.where(spike, clip_coefficient(clipped_to, g), 1.0)

        # EMA update with the effective (clipped) norm.
        effective = torch.where(spike, clipped_to, g0)
        new_mean = self.alpha * self._mean + (1 - self.alpha) * effective
        new_var = self.alpha * self._var + (1 - self.alpha) * (effective - new_mean) ** 2
        update = ready & finite
        self._mean = torch.where(update, new_mean, torch.where(now_ready, first_mean, self._mean))
        self._var = torch.where(update, new_var, torch.where(now_ready, first_var, self._var))

        boundary = torch.where(ready, self._mean + self.z_thresh * std, _scalar(math.inf, g))
        threshold = torch.where(spike, clipped_to, boundary)
        if self.warmup_max_norm is not None:
            cap = clip_coefficient(self.warmup_max_norm, g)
            scale = torch.where(ready, scale, torch.minimum(scale, cap))
            threshold = torch.where(
                ready, threshold, torch.minimum(threshold, _scalar(self.warmup_max_norm, g))
            )
        if self.max_norm is not None:
            scale = torch.minimum(scale, clip_coefficient(self.max_norm, g))
            threshold = torch.minimum(threshold, _scalar(self.max_norm, g))
        return Decision(scale=scale, threshold=threshold)


class AdaptiveTensorClip(Policy):
    """Per-tensor clipping against each tensor's own EMA norm (AdaGC-style).

    Wang et al. (2025), "AdaGC: Improving Training Stability for Large Language Model
    Pretraining": tensor ``i`` is clipped to ``relative · γᵢ`` where ``γᵢ`` is an EMA
    (factor ``beta``) of its clipped norms. For the first ``warmup_steps`` steps no
    per-tensor clip applies (the paper uses global clipping there: ``warmup_max_norm``)
    and ``γ`` follows the observed norms. Non-finite norms leave ``γ`` unchanged.
    """

    _state_names = ("_ema", "_step")

    def __init__(
        self,
        relative: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        warmup_max_norm: float | None = 1.0,
    ) -> None:
        self.relative = check.positive("relative", relative)
        if self.relative < 1.0:
            raise ValueError(f"relative must be >= 1, got {self.relative}")
        self.beta = check.in_open_unit("beta", beta)
        self.warmup_steps = check.positive_int("warmup_steps", warmup_steps, minimum=0)
        self.warmup_max_norm = (
            None
            if warmup_max_norm is None
            else check.non_negative("warmup_max_norm", warmup_max_norm)
        )
        self._ema: Tensor | None = None
        self._step = 0

    def _config(self):
        return {
            "relative": self.relative,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
            "warmup_max_norm": self.warmup_max_norm,
        }

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        norms = stats.norms.float()
        finite = torch.isfinite(norms)
        if self._ema is None or self._ema.shape != norms.shape:
            if self._ema is not None:
                raise ValueError(
                    f"AdaptiveTensorClip tracked {self._ema.numel()} tensors but got "
                    f"{norms.numel()}: the set of parameters with gradients changed"
                )
            self._ema = torch.where(finite, norms, 0.0)
        warming = self._step < self.warmup_steps
        self._step += 1
        decision = Decision()
        if warming:
            clipped = norms
            if self.warmup_max_norm is not None:
                total = stats.total_norm.float()
                decision.scale = clip_coefficient(self.warmup_max_norm, total)
                decision.threshold = _scalar(self.warmup_max_norm, total)
                clipped = norms * decision.scale
        else:
            limit = self.relative * self._ema
            coef = torch.where(finite, clip_coefficient(limit, norms), 1.0)
            decision.tensor_scale = coef
            clipped = norms * coef
        self._ema = torch.where(
            finite, self.beta * self._ema + (1 - self.beta) * clipped, self._ema
        )
        return decision

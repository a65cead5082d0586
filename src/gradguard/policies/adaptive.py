"""Clipping whose threshold follows the run: AutoClip, ZClip and a per-tensor EMA clip.

Each update is a pure function of the policy's state (see :mod:`.base`), selected with
``where`` rather than branches on values, so no step needs a host sync and a NaN or inf
norm never enters a history.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from .. import _validate as check
from ..ops import Array, Ops, clip_coefficient
from . import _histogram
from .base import Decision, Policy, StepInputs, finite_or


class AutoClipState(NamedTuple):
    """The exact history or sliding window (NaN where empty), the log-binned counts once
    past ``exact_until`` (always present under JAX), and the number of steps seen."""

    buffer: Array | None
    bins: Array | None
    count: Any


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

    State = AutoClipState

    def __init__(
        self, percentile: float = 10.0, history: int | None = None, exact_until: int = 4096
    ) -> None:
        self.percentile = check.in_range("percentile", percentile, 0.0, 100.0)
        self.history = None if history is None else check.positive_int("history", history)
        self.exact_until = check.positive_int("exact_until", exact_until)

    def _config(self):
        return {"percentile": self.percentile, "history": self.history}

    def init(self, inputs: StepInputs, xp: Ops) -> AutoClipState:
        like = inputs.total_norm
        size = self.exact_until if self.history is None else self.history
        bins = _histogram.empty(xp, like) if xp.traced and self.history is None else None
        return AutoClipState(xp.full(size, math.nan, like), bins, xp.counter(0))

    def update(
        self, state: AutoClipState, inputs: StepInputs, xp: Ops
    ) -> tuple[Decision, AutoClipState]:
        total = inputs.total_norm
        value = finite_or(xp, total, math.nan)
        q = self.percentile / 100.0
        if self.history is not None:
            window = xp.set_at(state.buffer, state.count % self.history, value)
            threshold = xp.nanquantile(xp.head(window, state.count + 1), q)
            state = AutoClipState(window, None, state.count + 1)
        else:
            exact, binned = functools.partial(_exact, xp, q), functools.partial(_binned, xp, q)
            state, threshold = xp.cond(state.count < self.exact_until, exact, binned, state, value)
        threshold = xp.where(xp.isnan(threshold), math.inf, threshold)
        return Decision(scale=clip_coefficient(xp, threshold, total), threshold=threshold), state


def _exact(xp: Ops, q: float, state: AutoClipState, value: Array) -> tuple[AutoClipState, Array]:
    buffer = xp.set_at(state.buffer, state.count, value)
    bins = (
        None if state.bins is None else _histogram.add(xp, state.bins, value)
    )  # JAX: kept current
    threshold = xp.nanquantile(xp.head(buffer, state.count + 1), q)
    return AutoClipState(buffer, bins, state.count + 1), threshold


def _binned(xp: Ops, q: float, state: AutoClipState, value: Array) -> tuple[AutoClipState, Array]:
    bins = state.bins
    if bins is None:  # the switch from the exact history to bin counts, once
        bins = _histogram.add(xp, _histogram.empty(xp, value), state.buffer)
    bins = _histogram.add(xp, bins, value)
    buffer = state.buffer if xp.traced else None  # constant memory from here on
    return AutoClipState(buffer, bins, state.count + 1), _histogram.quantile(xp, bins, q)


class ZClipState(NamedTuple):
    """Warm-up count and sums, then the EMA mean and variance of the (clipped) norms."""

    n: Array
    sum: Array
    sumsq: Array
    mean: Array
    var: Array


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

    Known limit (inherent in learning from clipped norms): a norm that climbs faster
    than the EMAs follow soon after the warm-up is clipped for good; a healthy LSTM
    whose norms rise ×10 in 50 steps kept a threshold of 0.32 against norms of 2–5 and
    clipped 88 % of its steps (``python -m benchmarks.efficacy.heldout``). That is why
    :func:`~gradguard.default_policy` is :class:`~gradguard.FeedbackClip` now.
    """

    State = ZClipState
    finite_fields = ZClipState._fields

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
        self.z_thresh = check.positive("z_thresh", z_thresh, float32=True)
        self.warmup_steps = check.positive_int("warmup_steps", warmup_steps)
        self.max_norm = (
            None if max_norm is None else check.non_negative("max_norm", max_norm, float32=True)
        )
        self.warmup_max_norm = (
            None
            if warmup_max_norm is None
            else check.non_negative("warmup_max_norm", warmup_max_norm, float32=True)
        )
        self.eps = check.positive("eps", eps, float32=True)

    def _config(self):
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
            "warmup_max_norm": self.warmup_max_norm,
        }

    def init(self, inputs: StepInputs, xp: Ops) -> ZClipState:
        zero = xp.scalar(0.0, inputs.total_norm)
        return ZClipState(zero, zero, zero, zero, zero)

    def update(self, state: ZClipState, inputs: StepInputs, xp: Ops) -> tuple[Decision, ZClipState]:
        g = inputs.total_norm
        finite = xp.isfinite(g)
        g0 = xp.where(finite, g, 0.0)  # a non-finite norm never enters the statistics
        ready = state.n >= self.warmup_steps  # statistics existed before this step
        decision, state = xp.cond(ready, self._track, self._warm_up, xp, state, g, finite, g0)
        if self.max_norm is not None:
            decision.scale = xp.minimum(decision.scale, clip_coefficient(xp, self.max_norm, g))
            decision.threshold = xp.minimum(decision.threshold, self.max_norm)
        return decision, state

    def _warm_up(
        self, xp: Ops, state: ZClipState, g: Array, finite: Array, g0: Array
    ) -> tuple[Decision, ZClipState]:
        """Accumulate the finite norms (capped: the ones applied); mean and variance follow."""
        applied = g0
        if self.warmup_max_norm is not None:
            applied = xp.minimum(applied, self.warmup_max_norm)
        n = state.n + finite
        total, total_sq = state.sum + applied, state.sumsq + applied * applied
        count = xp.maximum(n, 1.0)
        mean = total / count
        var = xp.maximum(total_sq / count - mean * mean, 0.0)
        if self.warmup_max_norm is None:
            decision = Decision(scale=xp.scalar(1.0, g), threshold=xp.scalar(math.inf, g))
        else:
            cap = self.warmup_max_norm
            decision = Decision(scale=clip_coefficient(xp, cap, g), threshold=xp.scalar(cap, g))
        return decision, ZClipState(n, total, total_sq, mean, var)

    def _track(
        self, xp: Ops, state: ZClipState, g: Array, finite: Array, g0: Array
    ) -> tuple[Decision, ZClipState]:
        """Clip a spike against the statistics from before this step, then update the EMAs
        with the effective (clipped) norm."""
        std = xp.sqrt(state.var)
        z = (g0 - state.mean) / (std + self.eps)
        spike = finite & (z > self.z_thresh)
        clipped_to = state.mean + self.z_thresh**2 * std / xp.maximum(z, self.eps)
        scale = xp.where(spike, clip_coefficient(xp, clipped_to, g), 1.0)
        effective = xp.where(spike, clipped_to, g0)
        new_mean = self.alpha * state.mean + (1 - self.alpha) * effective
        deviation = effective - new_mean
        new_var = self.alpha * state.var + (1 - self.alpha) * (deviation * deviation)
        mean = xp.where(finite, new_mean, state.mean)
        var = xp.where(finite, new_var, state.var)
        threshold = xp.where(spike, clipped_to, mean + self.z_thresh * std)
        tracked = ZClipState(state.n, state.sum, state.sumsq, mean, var)
        return Decision(scale=scale, threshold=threshold), tracked


class AdaptiveTensorClipState(NamedTuple):
    """Each tensor's EMA of its clipped norm, and the number of steps seen."""

    ema: Array
    step: Any


class AdaptiveTensorClip(Policy):
    """Per-tensor clipping against each tensor's own EMA norm (AdaGC-style).

    Wang et al. (2025), "AdaGC: Improving Training Stability for Large Language Model
    Pretraining": tensor ``i`` is clipped to ``relative · γᵢ`` where ``γᵢ`` is an EMA
    (factor ``beta``) of its clipped norms. For the first ``warmup_steps`` steps no
    per-tensor clip applies (the paper uses global clipping there: ``warmup_max_norm``)
    and ``γ`` follows the observed norms. Non-finite norms leave ``γ`` unchanged.
    """

    State = AdaptiveTensorClipState
    finite_fields = ("ema",)

    def __init__(
        self,
        relative: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        warmup_max_norm: float | None = 1.0,
    ) -> None:
        self.relative = check.positive("relative", relative, float32=True)
        if self.relative < 1.0:
            raise ValueError(f"relative must be >= 1, got {self.relative}")
        self.beta = check.in_open_unit("beta", beta)
        self.warmup_steps = check.positive_int("warmup_steps", warmup_steps, minimum=0)
        self.warmup_max_norm = (
            None
            if warmup_max_norm is None
            else check.non_negative("warmup_max_norm", warmup_max_norm, float32=True)
        )

    def _config(self):
        return {
            "relative": self.relative,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
            "warmup_max_norm": self.warmup_max_norm,
        }

    def init(self, inputs: StepInputs, xp: Ops) -> AdaptiveTensorClipState:
        return AdaptiveTensorClipState(xp.full(inputs.count, 0.0, inputs.total_norm), xp.counter(0))

    def update(
        self, state: AdaptiveTensorClipState, inputs: StepInputs, xp: Ops
    ) -> tuple[Decision, AdaptiveTensorClipState]:
        norms = inputs.norms
        if tuple(state.ema.shape) != tuple(norms.shape):
            raise ValueError(
                f"AdaptiveTensorClip tracked {state.ema.shape[0]} tensors but got "
                f"{norms.shape[0]}: the set of parameters with gradients changed"
            )
        # The EMA starts from the first norms seen.
        start = xp.cond(state.step == 0, _first_norms, _same_ema, xp, state, inputs)
        state = AdaptiveTensorClipState(start, state.step)
        warming = state.step < self.warmup_steps
        decision, clipped = xp.cond(warming, self._warm, self._clip, xp, state, inputs)
        finite = xp.isfinite(norms)
        ema = xp.where(finite, self.beta * start + (1 - self.beta) * clipped, start)
        return decision, AdaptiveTensorClipState(ema, state.step + 1)

    def _warm(self, xp: Ops, state: Any, inputs: StepInputs) -> tuple[Decision, Array]:
        if self.warmup_max_norm is None:
            return Decision(), inputs.norms
        total = inputs.total_norm
        scale = clip_coefficient(xp, self.warmup_max_norm, total)
        decision = Decision(scale=scale, threshold=xp.scalar(self.warmup_max_norm, total))
        return decision, inputs.norms * scale

    def _clip(self, xp: Ops, state: Any, inputs: StepInputs) -> tuple[Decision, Array]:
        norms = inputs.norms
        limit = self.relative * state.ema
        coef = xp.where(xp.isfinite(norms), clip_coefficient(xp, limit, norms), 1.0)
        return Decision(tensor_scale=coef), norms * coef


def _first_norms(xp: Ops, state: AdaptiveTensorClipState, inputs: StepInputs) -> Array:
    return finite_or(xp, inputs.norms, 0.0)


def _same_ema(xp: Ops, state: AdaptiveTensorClipState, inputs: StepInputs) -> Array:
    return state.ema

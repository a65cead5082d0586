"""FeedbackClip: a clip threshold that tunes itself from the gradient norm and the loss.

Three rules, the first two on the log of the step's *size*: the gradient norm times
how far the learning rate is above a reference that rises with it like an EMA and never
follows it down (a warm-up's smooth rise cancels out, an LR above any the run trained at
shows as a jump, and a decay or a restart to an LR already used changes nothing; the
bare norm when no LR is given):

* **Spike rule** (after ZClip, in log space). A size more than ``spike`` × the running
  typical size (an EMA of the sizes applied) is clipped, the harder the larger it is:
  a log excess ``e`` over the typical size beyond the margin ``t = log(spike)`` is cut
  to ``t²/e``. Spikes are rare by definition: where more than ``spike_rate`` (2 %) of
  the steps go beyond the margin (a model that fits most of its batches, whose few
  others give gradients a hundred times larger), the margin widens to that quantile of
  the sizes. The typical size and the margin learn from the clipped sizes and are held
  while the loss is elevated, so they never chase a divergence.
* **Loss feedback** (GradScaler's back-off and growth, with the loss in the role of the
  overflow check). The loss, filtered by a median of the last three, is compared with a
  slow EMA of clamped losses; a *divergence* is a filtered loss above that reference by
  more than ``loss_z`` noise deviations and ``progress`` of the progress made since the
  first loss, ``persist`` steps in a row. The noise is measured from successive
  differences of the losses (the smaller of the last two, not where both rise), so
  neither a low first loss nor a divergence's onset enters it; a plain mean over its
  first samples, then an EMA held while the loss is elevated. When a divergence begins,
  a ceiling on the size drops to ``min(backoff × ceiling, first × typical size)``;
  after ``interval`` healthy steps it grows ×``growth``.
* **Unstable SGD step** (needs no history). Where the optimizer's step is ``lr × g``
  (``torch.optim.SGD``; the guard then gives the weights' norm ``‖w‖`` and momentum's
  gain ``k = (1 - dampening) / (1 - momentum)``, 10 at momentum 0.9, 1 without), a step
  whose *carried* size ``k · lr · ‖g‖`` (how far a gradient that persists moves the
  weights) exceeds ``step_alarm`` (0.5) × ``‖w‖`` *and* that would overshoot the loss,
  ``lr · ‖g‖² > step_overshoot × loss`` (4), lowers the ceiling to a carried step of
  ``step_ratio`` (0.1): ``k · lr · ‖g‖ = 0.1 · ‖w‖``. The second test is the stability
  bound of gradient descent on a quadratic whose minimum is 0: there
  ``‖g‖² = 2λ · loss``, so ``lr · ‖g‖² / loss = 2 · lr · λ``, and a step is unstable
  beyond ``lr · λ = 2``; it keeps the rule off a linear or logistic model whose weights
  start small and must grow (big steps relative to the weights, yet no overshoot).
  Judging the carried step keeps it off plain SGD at a high LR on the edge of stability
  (whose single steps are big but are not carried on), and on momentum SGD it acts at
  a single step of 5 % of ``‖w‖`` that also overshoots: healthy momentum networks stay
  under that (CNNs early in training reach 3–4 %, far from overshooting); a run unstable
  from its first step (an RNN whose gradient explodes) starts at 5–16 % and an overshoot
  of 4.5–15, before the other two rules have any past to judge by. Needs the step's
  mean loss (under gradient accumulation the whole step's, not a micro-batch's share: a
  loss k times too small makes every step look k times more overshooting); without one
  the rule does nothing (the guard warns once). ``step_ratio=0`` switches it off.

The update is pure, over an explicit :class:`FeedbackState` of 0-d float32 arrays,
written once over :mod:`gradguard.ops`: it runs on the device (no host sync), on host
NumPy and under ``jax.jit``, and the whole state is in ``state_dict()``. The loss and
learning rate come from the step's :class:`~gradguard.policies.StepInputs`
(``guard.step(optimizer, loss=loss)``; the guard reads the LR from the optimizer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _validate as check
from ..ops import Array, Ops, clip_coefficient
from .base import Decision, Policy, StepInputs

_LN10 = math.log(10.0)
#: The mean absolute deviation of Gaussian noise over the mean of the smaller of two
#: successive differences' sizes, where not both rise (1.04; 1.10 for exponential noise).
_NOISE_PER_DIFFERENCE = 1.05


@dataclass(frozen=True)
class FeedbackConfig:
    """Settings of :class:`FeedbackClip` (the rules: :mod:`gradguard.policies.feedback`)."""

    spike: float = 4.0  #: a size above spike × the typical size is a spike ...
    #: ... unless more than this share of the steps are: then the margin widens
    spike_rate: float = 0.02
    widen: float = 0.1  #: the margin's (log) step up at each size beyond it
    beta: float = 0.95  #: EMA factor of the typical size
    backoff: float = 0.5  #: each new divergence multiplies the ceiling by this
    first: float = 2.0  #: ... but puts it at most at first × the typical size
    growth: float = 2.0  #: the ceiling grows by this factor ...
    interval: int = 200  #: ... after this many healthy steps
    loss_beta: float = 0.95  #: EMA factor of the loss reference and its noise
    loss_z: float = 3.0  #: a divergence is this many noise deviations above the reference
    progress: float = 0.05  #: ... and at least this share of the progress since the start
    persist: int = 3  #: ... on this many steps in a row (of the median of three losses)
    lr_beta: float = 0.9  #: EMA factor of the (log) learning rate's rising reference
    #: an SGD step whose carried size, gain · lr · ‖g‖ (gain: SGD's momentum gain,
    #: (1 - dampening) / (1 - momentum), 10 at momentum 0.9), exceeds this share of the
    #: weights' norm ...
    step_alarm: float = 0.5
    #: ... and would overshoot the loss, lr · ‖g‖² > step_overshoot × loss (0: not asked) ...
    step_overshoot: float = 4.0
    #: ... lowers the ceiling to a carried step of this share (0: the rule is off)
    step_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not self.spike > 1.0:
            raise ValueError(f"spike must be > 1, got {self.spike}")
        check.in_open_unit("spike_rate", self.spike_rate)
        check.positive("widen", self.widen)
        check.in_open_unit("beta", self.beta)
        check.in_open_unit("backoff", self.backoff)
        check.positive("first", self.first)
        if not self.growth >= 1.0 or not math.isfinite(self.growth):
            raise ValueError(f"growth must be a finite number >= 1, got {self.growth}")
        check.positive_int("interval", self.interval)
        check.in_open_unit("loss_beta", self.loss_beta)
        check.positive("loss_z", self.loss_z)
        check.non_negative("progress", self.progress)
        check.positive_int("persist", self.persist)
        check.in_open_unit("lr_beta", self.lr_beta)
        check.positive("step_alarm", self.step_alarm)
        check.non_negative("step_overshoot", self.step_overshoot)
        check.non_negative("step_ratio", self.step_ratio)


class FeedbackState(NamedTuple):
    """The controller's state: 0-d float32 arrays, natural logs of sizes where noted."""

    count: Array  # finite norms seen
    level: Array  # log of an EMA of the sizes applied
    lr_level: Array  # the log learning rate's reference: rises like an EMA, never falls
    ceiling: Array  # log ceiling on the size (+inf: none yet)
    healthy: Array  # steps since the last divergence or growth
    seen: Array  # finite losses seen
    start: Array  # the first finite loss
    slow: Array  # slow EMA of the (clamped) loss: the reference
    dev: Array  # the losses' noise: an EMA of successive differences (see _loss_feedback)
    prev1: Array  # the last loss (+inf when non-finite)
    prev2: Array  # the loss before it
    streak: Array  # consecutive steps with an elevated filtered loss
    episodes: Array  # divergences detected so far
    margin: Array  # how much (log) wider than log(spike) the spike margin is
    beyond: Array  # 1 when the last step's size was beyond the margin


_LOSS = FeedbackState._fields.index("seen")  # the loss statistics: the fields from here ...
_MARGIN = FeedbackState._fields.index("margin")  # ... to here
_STREAK = FeedbackState._fields.index("streak")


def initial_state(xp: Ops, like: Array) -> FeedbackState:
    """The state before the first step, where ``like`` lives."""
    zero, inf = xp.scalar(0.0, like), xp.scalar(math.inf, like)
    return FeedbackState(zero, zero, zero, inf, *([zero] * 11))


def _ln(xp: Ops, x: Array) -> Array:
    return xp.log10(x) * _LN10  # the ops have log10 only


def _exp(x: Array) -> Array:
    return 10.0 ** (x * (1.0 / _LN10))


def _spike_margin(state: FeedbackState, config: FeedbackConfig) -> Array:
    """How far (log) above the typical size a spike begins: ``log(spike)``, widened where
    sizes beyond it are not rare (the state keeps the widening)."""
    return state.margin + math.log(config.spike)


def _median3(xp: Ops, a: Array, b: Array, c: Array) -> Array:
    return xp.maximum(xp.minimum(a, b), xp.minimum(xp.maximum(a, b), c))


def _loss_feedback(
    xp: Ops, state: FeedbackState, value: Array, config: FeedbackConfig
) -> tuple[Array, Array, tuple[Array, ...]]:
    """Update the loss statistics; lower the ceiling when a divergence begins.

    Returns the ceiling, the healthy-step count and the new loss statistics (the
    state's fields from ``seen`` to ``episodes``, in order).

    Written for few operations (each is a kernel launch on a device): a flag times a
    number stands for a select where the two agree bit for bit, and the slots a
    decision cannot read yet (the previous losses before two were seen; the reference,
    zero until the first finite loss) are written without a select.
    """
    ok = xp.isfinite(value)
    raw = xp.where(ok, value, math.inf)
    has2 = state.seen > 1
    # the median of the last three losses (of fewer, the loss itself: median(r, x, r) = r)
    filtered = xp.where(has2, _median3(xp, raw, state.prev1, state.prev2), raw)
    # The noise: the batch losses' spread, from successive differences, the smaller of
    # the last two (a jump, such as a divergence's onset, is in one of them only; a
    # level, low or high, does not enter at all), except where both rise (a loss that
    # climbs step after step is a trend, not noise). A plain mean over its first
    # samples, then an EMA. It learns at every step while it is a plain mean (a noisy
    # start cannot lock it at zero), then only where the loss is not elevated (a
    # divergence cannot blind the test).
    known1, known2 = xp.isfinite(state.prev1), xp.isfinite(state.prev2)
    last = xp.where(known1, state.prev1, 0.0)  # (a non-finite loss is kept as +inf)
    rise = xp.where(ok, value, 0.0) - last
    last_rise = last - xp.where(known2, state.prev2, 0.0)
    sample = _NOISE_PER_DIFFERENCE * xp.minimum(abs(rise), abs(last_rise))
    learn = has2 & ok & known1 & known2 & ((rise <= 0) | (last_rise <= 0))
    b = config.loss_beta
    mean = 1.0 / xp.maximum(state.seen - 1.0, 1.0)  # the weight of a plain mean
    noise = xp.where(learn, state.dev + xp.maximum(mean, 1.0 - b) * (sample - state.dev), state.dev)
    scale = xp.maximum(noise, 0.02 * abs(state.slow))
    tolerance = xp.maximum(config.loss_z * scale, config.progress * (state.start - state.slow))
    elevated = has2 & (filtered - state.slow > tolerance)
    dev = xp.where((mean > 1.0 - b) | ~elevated, noise, state.dev)
    streak = (state.streak + 1.0) * elevated
    diverging = streak >= config.persist
    begins = streak == config.persist
    typical = xp.where(state.count > 0, state.level + math.log(config.first), math.inf)
    lowered = xp.minimum(state.ceiling + math.log(config.backoff), typical)
    ceiling = xp.where(begins, lowered, state.ceiling)
    healthy = xp.where(diverging, 0.0, state.healthy + 1.0)
    # the reference takes clamped losses, so a divergence cannot drag it upward
    clamped = xp.minimum(xp.where(ok, value, state.slow), state.slow + config.loss_z * scale)
    first = state.seen <= 0  # no finite loss yet: the reference is still zero here
    slow = xp.where(first, xp.where(ok, value, 0.0), b * state.slow + (1 - b) * clamped)
    statistics = (
        state.seen + ok,  # seen
        xp.where(first & ok, value, state.start),  # start
        slow,
        dev,
        raw,  # prev1
        state.prev1,  # prev2
        streak,
        state.episodes + begins,  # episodes
    )
    return ceiling, healthy, statistics


def _lr_shift(
    xp: Ops, state: FeedbackState, lr: Any, config: FeedbackConfig
) -> tuple[Array, Array | float]:
    """The LR's log reference updated, and how far (log) the LR is above it (0 without an
    LR, and at or under it).

    The reference rises toward the LR like an EMA and never follows it down: an LR above
    any the run has trained at shows as a jump for a few steps, while a decay, and a
    restart back to an LR already used (warm restarts, cyclic schedules), change nothing.
    """
    if lr is None:
        return state.lr_level, 0.0
    c = config.lr_beta
    if isinstance(lr, (int, float)):  # a host number: its log on the host
        if not lr > 0:
            return state.lr_level, 0.0
        log_lr: Array = math.log(lr)
        lr_level = xp.where(state.count > 0, state.lr_level, log_lr)
        level = c * lr_level + (1 - c) * xp.maximum(lr_level, log_lr)
        return level, xp.maximum(log_lr - lr_level, 0.0)
    value = xp.f32(lr)  # an array (a tensor LR on the device, or traced)
    positive = value > 0
    log_lr = _ln(xp, xp.where(positive, value, 1.0))
    lr_level = xp.where(state.count > 0, state.lr_level, log_lr)
    level = xp.where(
        positive, c * lr_level + (1 - c) * xp.maximum(lr_level, log_lr), state.lr_level
    )
    return level, xp.where(positive, xp.maximum(log_lr - lr_level, 0.0), 0.0)


def feedback_update(
    xp: Ops, state: FeedbackState, inputs: StepInputs, config: FeedbackConfig
) -> tuple[FeedbackState, Array]:
    """One decision: the new state and this step's threshold on the norm (``inf``: none).

    Pure: reads ``state``, the step's global norm, its loss and learning rate (either
    may be ``None``), and returns new arrays. A step whose gradient norm is not finite
    is skipped (``SkipNonFinite``): it leaves the state as it was, its loss and LR
    included, so later decisions are those of a run that never saw it.
    """
    live = xp.isfinite(inputs.total_norm)
    return xp.cond(live, _update, _hold, xp, state, inputs, config)


def _unstable_step(
    xp: Ops, ceiling: Array, healthy: Array, inputs: StepInputs, shift: Any, config: FeedbackConfig
) -> tuple[Array, Array]:
    """An SGD step whose carried size ``k · lr · ‖g‖`` exceeds ``step_alarm × ‖w‖`` and
    that would overshoot the loss (``lr · ‖g‖² > step_overshoot × loss``) lowers the
    ceiling to a carried step of ``step_ratio × ‖w‖`` (``k``: ``inputs.step_gain``).

    Only where the guard gives the weights' norm (the optimizer is SGD, whose step is
    ``lr × g``), an LR, and (unless ``step_overshoot`` is 0) a positive loss. It needs
    no history: it acts from the first step, before any statistic could be learnt,
    which is when a run unstable from the start is lost. Returns the ceiling and the
    healthy-step count.
    """
    weights, lr, g = inputs.weight_norm, inputs.lr, inputs.total_norm
    if weights is None or lr is None or config.step_ratio == 0:
        return ceiling, healthy
    loss = inputs.loss
    if config.step_overshoot > 0 and loss is None:  # the overshoot cannot be judged
        return ceiling, healthy
    usable = (weights > 0) & xp.isfinite(weights) & xp.isfinite(g)
    if isinstance(lr, (int, float)):  # a host number
        if not lr > 0:
            return ceiling, healthy
    else:
        lr = xp.f32(lr)
        usable = usable & (lr > 0)
        lr = xp.where(lr > 0, lr, 1.0)
    gain = inputs.step_gain  # a host number, or a tensor where the update is compiled
    if not (isinstance(gain, float) and gain == 1.0):  # the step a persistent gradient
        weights = weights * (1.0 / gain)  # makes, against the weights
    unstable = usable & (g * lr > weights * config.step_alarm)
    if config.step_overshoot > 0:  # lr·‖g‖²/loss = 2·lr·λ on a quadratic with minimum 0
        loss = xp.f32(loss)
        unstable = unstable & (loss > 0) & (g * g * lr > loss * config.step_overshoot)
    tight = (weights * config.step_ratio) / lr  # the norm of a step_ratio carried step
    size = _ln(xp, xp.where(unstable, tight, 1.0)) + shift
    return xp.where(unstable, xp.minimum(ceiling, size), ceiling), xp.where(unstable, 0.0, healthy)


def _grow(xp: Ops, ceiling: Array, healthy: Array, config: FeedbackConfig) -> tuple[Array, Array]:
    """After ``interval`` healthy steps in a row the ceiling grows ×``growth``."""
    grow = healthy >= config.interval
    return xp.where(grow, ceiling + math.log(config.growth), ceiling), xp.where(grow, 0.0, healthy)


def _hold(
    xp: Ops, state: FeedbackState, inputs: StepInputs, config: FeedbackConfig
) -> tuple[FeedbackState, Array]:
    """A skipped step: the state unchanged, the threshold a typical step would get."""
    bound = xp.minimum(state.level + _spike_margin(state, config), state.ceiling)
    return state, _exp(xp.where(state.count > 0, bound, math.inf))


def _update(
    xp: Ops, state: FeedbackState, inputs: StepInputs, config: FeedbackConfig
) -> tuple[FeedbackState, Array]:
    g = inputs.total_norm
    finite = xp.isfinite(g) & (g > 0)
    # the size is the norm times how far the LR is above its rising reference: a
    # warm-up cancels out, an LR above any used shows as a jump, a decay or a restart
    # to an LR already used changes nothing
    # (the new state is built once: on the host, rebuilding it per rule costs more than
    # the rules' arithmetic)
    lr_level, shift = _lr_shift(xp, state, inputs.lr, config)
    if inputs.loss is not None:
        ceiling, healthy, statistics = _loss_feedback(xp, state, xp.f32(inputs.loss), config)
    else:
        ceiling, healthy, statistics = state.ceiling, state.healthy + 1.0, state[_LOSS:_MARGIN]
    ceiling, healthy = _unstable_step(xp, ceiling, healthy, inputs, shift, config)
    ceiling, healthy = _grow(xp, ceiling, healthy, config)
    size = _ln(xp, xp.where(finite, g, 1.0)) + shift
    ready = state.count > 0
    # spike rule (in log space, after ZClip): a size `excess` above the level beyond
    # the margin t is clipped to level + t²/excess: the larger the outlier, the harder
    t = _spike_margin(state, config)
    excess = xp.maximum(size - state.level, t)
    spike = xp.where(ready, state.level + t * t / excess, math.inf)
    bound = xp.minimum(spike, ceiling)
    applied = xp.minimum(size, bound)
    b = config.beta
    # the typical size is an EMA of the applied sizes themselves (its log is kept): a
    # spike moves it up by a bounded step (the applied size is within the margin) and a
    # size near zero down by at most log(beta); an EMA of the log sizes would fall
    # without bound on batches whose gradient vanishes (a model that fits most of its
    # batches), until every informative step is clipped
    level = state.level + _ln(xp, b + (1 - b) * _exp(applied - state.level))
    level = xp.where(ready, level, applied)
    # the margin tracks the (1 - spike_rate) quantile of the sizes above the level, never
    # under log(spike): spikes are rare and isolated by definition; where isolated sizes
    # beyond it are not rare (a model that fits most batches, whose few others give
    # gradients a hundred times larger), they are the run's spread, not outliers. A run
    # of them is a new regime (an LR jump, a divergence) and does not widen it, nor does
    # a step the ceiling holds (its size is the ceiling's business).
    beyond = ready & (size - state.level > t) & (spike < ceiling)
    widen = beyond & (state.beyond == 0)
    down = config.widen * config.spike_rate / (1.0 - config.spike_rate)
    margin = xp.maximum(xp.where(widen, state.margin + config.widen, state.margin - down), 0.0)
    # the statistics are held while the loss is elevated: they never chase a divergence
    update = finite & (statistics[_STREAK - _LOSS] == 0)
    new = FeedbackState(
        state.count + finite,
        xp.where(update, level, state.level),
        lr_level,
        ceiling,
        healthy,
        *statistics,
        xp.where(update, margin, state.margin),
        xp.where(beyond, 1.0, 0.0),
    )
    return new, _exp(bound - shift)


class FeedbackClip(Policy):
    """Self-tuning clipping: no threshold to choose (the rules: :mod:`.feedback`).

    The default policy, after :class:`~gradguard.SkipNonFinite`
    (:func:`~gradguard.default_policy`).

    Clips a step whose size jumps above 4× the run's typical size (harder the larger the
    jump; an LR jump counts; wider where such sizes are not rare), and, once the loss
    diverges, caps the size at twice the typical one, halving that cap at each new
    divergence and doubling it after 200 healthy steps. Under SGD, a step whose carried
    size (``lr · ‖g‖`` times momentum's gain, 10 at momentum 0.9) exceeds half the
    weights' norm and that would overshoot the loss (``lr · ‖g‖² > 4 × loss``) caps carried steps
    at 10 % of the weights' norm (relaxed the same way): for SGD runs unstable from
    their first step, before any statistic exists (``step_ratio=0`` switches it off). It
    reads each step's loss (``guard.step(optimizer, loss=loss)``) and learning rate;
    without a loss it only clips spikes of the update size. Works with
    :class:`~gradguard.Rewind`: a divergence it detects makes the rewinder restore the
    last snapshot, and its ceiling stays tightened (:meth:`rewound`).

    Args: the fields of :class:`FeedbackConfig`; the defaults are the measured ones
    (``benchmarks/efficacy``).
    """

    State = FeedbackState
    compilable = True
    finite_fields = (
        "count", "level", "lr_level", "healthy", "seen", "start", "streak", "margin", "beyond"
    )  # fmt: skip

    def __init__(self, **settings: Any) -> None:
        self.config = FeedbackConfig(**settings)

    def _config(self) -> dict[str, Any]:
        return asdict(self.config)

    @property
    def reads_weight_norm(self) -> bool:  # type: ignore[override]
        return self.config.step_ratio > 0

    @property
    def needs_loss(self) -> bool:  # type: ignore[override]
        """The unstable-step rule's overshoot test reads the loss (SGD steps only)."""
        return self.config.step_ratio > 0 and self.config.step_overshoot > 0

    def init(self, inputs: StepInputs, xp: Ops) -> FeedbackState:
        return initial_state(xp, inputs.total_norm)

    def update(
        self, state: FeedbackState, inputs: StepInputs, xp: Ops
    ) -> tuple[Decision, FeedbackState]:
        state, threshold = feedback_update(xp, state, inputs, self.config)
        scale = clip_coefficient(xp, threshold, inputs.total_norm)
        return Decision(scale=scale, threshold=threshold), state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; one saved before the margin existed gets ``log(spike)``."""
        state = dict(state)
        if "margin" not in state and "_margin" not in state and state.get("level") is not None:
            state["margin"] = state["beyond"] = torch.zeros(())
        super().load_state_dict(state)

    @property
    def divergences(self) -> Tensor:
        """Loss divergences detected so far (0-d tensor; :class:`~gradguard.Rewind` reads it)."""
        saved = self.state_dict().get("episodes")
        return saved if isinstance(saved, Tensor) else torch.zeros(())

    def rewound(self, previous: dict[str, Any]) -> None:
        """After a rewind: keep the lesson, a ceiling ``backoff`` × tighter than before it.

        ``previous`` is the :meth:`state_dict` from just before the rewind; the current
        state is the restored snapshot's.
        """
        if not previous or previous.get("ceiling") is None:
            return
        before = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in previous.items()}
        base = torch.where(
            torch.isfinite(before["ceiling"]),
            before["ceiling"],
            torch.where(
                before["count"] > 0, before["level"] + math.log(self.config.first), math.inf
            ),
        )
        lowered = base + math.log(self.config.backoff)
        current = self.state_dict()
        if current.get("ceiling") is None:  # rewound to before the first step
            current = {k: torch.zeros(()) for k in FeedbackState._fields}
            current["ceiling"] = torch.full((), math.inf)
        ceiling = torch.as_tensor(current["ceiling"], dtype=torch.float32)
        current["ceiling"] = torch.minimum(ceiling.to(lowered.device), lowered)
        current["episodes"] = before["episodes"].clone()
        self.load_state_dict(current)

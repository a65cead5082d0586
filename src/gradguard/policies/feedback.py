"""FeedbackClip: a clip threshold that tunes itself from the gradient norm and the loss.

Two rules, both on the log of the step's *size*: the gradient norm times the learning
rate relative to its own recent level (so a schedule's smooth changes cancel out and
a jump shows as a jump; the bare norm when no LR is given):

* **Spike rule** (after ZClip, in log space). A size more than ``spike`` × the running
  typical size (an EMA of the log sizes applied) is clipped, the harder the larger it
  is: an excess ``e`` over the typical size beyond ``t = log(spike)`` is cut to
  ``t²/e``. The typical size learns from the clipped sizes and is held while the loss
  is elevated, so it never chases a divergence.
* **Loss feedback** (GradScaler's back-off and growth, with the loss in the role of the
  overflow check). The loss, filtered by a median of the last three, is compared with a
  slow EMA of clamped losses; a *divergence* is a filtered loss above that reference by
  more than ``loss_z`` noise deviations and ``progress`` of the progress made since the
  first loss, ``persist`` steps in a row. When one begins, a ceiling on the size drops
  to ``min(backoff × ceiling, first × typical size)``; after ``interval`` healthy steps
  it grows ×``growth``.

The update is one pure function, :func:`feedback_clip`, over an explicit
:class:`FeedbackState` of 0-d tensors: no host sync, the whole state in ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _validate as check
from ..functional import clip_coefficient
from ..stats import GradStats
from .base import Decision, Policy, require_grads


@dataclass(frozen=True)
class FeedbackConfig:
    """Settings of :class:`FeedbackClip` (the rules: :mod:`gradguard.policies.feedback`)."""

    spike: float = 4.0  #: a size above spike × the typical size is a spike
    beta: float = 0.95  #: EMA factor of the typical (log) size
    backoff: float = 0.5  #: each new divergence multiplies the ceiling by this
    first: float = 2.0  #: ... but puts it at most at first × the typical size
    growth: float = 2.0  #: the ceiling grows by this factor ...
    interval: int = 200  #: ... after this many healthy steps
    loss_beta: float = 0.95  #: EMA factor of the loss reference and its noise
    loss_z: float = 3.0  #: a divergence is this many noise deviations above the reference
    progress: float = 0.05  #: ... and at least this share of the progress since the start
    persist: int = 3  #: ... on this many steps in a row (of the median of three losses)
    lr_beta: float = 0.9  #: EMA factor of the (log) learning rate's recent level

    def __post_init__(self) -> None:
        if not self.spike > 1.0:
            raise ValueError(f"spike must be > 1, got {self.spike}")
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


class FeedbackState(NamedTuple):
    """The controller's state: 0-d float32 tensors, logs of sizes where noted."""

    count: Tensor  # finite norms seen
    level: Tensor  # EMA of the log size applied
    lr_level: Tensor  # EMA of the log learning rate
    ceiling: Tensor  # log ceiling on the size (+inf: none yet)
    healthy: Tensor  # steps since the last divergence or growth
    seen: Tensor  # finite losses seen
    start: Tensor  # the first finite loss
    slow: Tensor  # slow EMA of the (clamped) loss: the reference
    dev: Tensor  # EMA of the absolute deviation of the clamped loss from the reference
    prev1: Tensor  # the last loss (+inf when non-finite)
    prev2: Tensor  # the loss before it
    streak: Tensor  # consecutive steps with an elevated filtered loss
    episodes: Tensor  # divergences detected so far


def initial_state(device: torch.device | str | None = None) -> FeedbackState:
    """The state before the first step."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    inf = torch.full((), math.inf, dtype=torch.float32, device=device)
    return FeedbackState(zero, zero, zero, inf, *([zero] * 9))


def _median3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _loss_feedback(state: FeedbackState, loss: Tensor, config: FeedbackConfig) -> FeedbackState:
    """Update the loss statistics; lower the ceiling when a divergence begins."""
    value = loss.detach().float().reshape(())
    ok = torch.isfinite(value)
    raw = torch.where(ok, value, math.inf)
    has1, has2 = state.seen > 0, state.seen > 1
    last, before = torch.where(has1, state.prev1, raw), torch.where(has2, state.prev2, raw)
    filtered = _median3(raw, last, before)
    scale = torch.maximum(state.dev, 0.02 * state.slow.abs())
    tolerance = torch.maximum(config.loss_z * scale, config.progress * (state.start - state.slow))
    elevated = has1 & (filtered - state.slow > tolerance)
    streak = torch.where(elevated, state.streak + 1, 0.0)
    diverging = streak >= config.persist
    begins = streak == config.persist
    typical = torch.where(state.count > 0, state.level + math.log(config.first), math.inf)
    lowered = torch.minimum(state.ceiling + math.log(config.backoff), typical)
    ceiling = torch.where(begins, lowered, state.ceiling)
    healthy = torch.where(diverging, 0.0, state.healthy + 1)
    grow = healthy >= config.interval
    ceiling = torch.where(grow, ceiling + math.log(config.growth), ceiling)
    healthy = torch.where(grow, 0.0, healthy)
    # the reference takes clamped losses, so a divergence cannot drag it upward
    clamped = torch.minimum(torch.where(ok, value, state.slow), state.slow + config.loss_z * scale)
    b = config.loss_beta
    first = ~has1
    slow = torch.where(first, torch.where(ok, value, 0.0), b * state.slow + (1 - b) * clamped)
    # the noise scale learns from healthy steps only: a divergence cannot blind the test
    noise = b * state.dev + (1 - b) * (clamped - state.slow).abs()
    dev = torch.where(first, 0.0, torch.where(elevated, state.dev, noise))
    return state._replace(
        ceiling=ceiling,
        healthy=healthy,
        seen=state.seen + ok.float(),
        start=torch.where(first & ok, value, state.start),
        slow=torch.where(ok | has1, slow, state.slow),
        dev=torch.where(ok | has1, dev, state.dev),
        prev1=torch.where(ok | has1, raw, state.prev1),
        prev2=torch.where(ok | has1, torch.where(has1, state.prev1, raw), state.prev2),
        streak=streak,
        episodes=state.episodes + begins.float(),
    )


def feedback_clip(
    state: FeedbackState,
    norm: Tensor,
    loss: Tensor | None = None,
    lr: float | None = None,
    config: FeedbackConfig = FeedbackConfig(),
) -> tuple[FeedbackState, Tensor]:
    """One decision: the new state and this step's threshold on the norm (``inf``: none).

    Pure: reads ``state``, the step's gradient ``norm``, its ``loss`` (optional) and the
    optimizer's ``lr`` (optional, a host number), and returns new tensors.
    """
    g = norm.detach().float()
    finite = torch.isfinite(g) & (g > 0)
    # the size is the norm times the LR relative to its recent level: a schedule's smooth
    # changes cancel out, a jump shows as a jump
    shift: Tensor | float = 0.0
    if lr is not None and lr > 0:
        log_lr = math.log(lr)
        lr_level = torch.where(state.count > 0, state.lr_level, log_lr)
        shift = log_lr - lr_level
        c = config.lr_beta
        state = state._replace(lr_level=c * lr_level + (1 - c) * log_lr)
    if loss is not None:
        state = _loss_feedback(state, loss, config)
    size = torch.where(finite, g, 1.0).log() + shift
    ready = state.count > 0
    # spike rule (in log space, after ZClip): a size `excess` above the level beyond
    # t = log(spike) is clipped to level + t²/excess: the larger the outlier, the harder
    t = math.log(config.spike)
    excess = (size - state.level).clamp(min=t)
    spike = torch.where(ready, state.level + t * t / excess, math.inf)
    bound = torch.minimum(spike, state.ceiling)
    applied = torch.minimum(size, bound)
    b = config.beta
    level = torch.where(ready, b * state.level + (1 - b) * applied, applied)
    # the level is held while the loss is elevated: it never chases a divergence
    update = finite & (state.streak == 0)
    state = state._replace(
        count=state.count + finite.float(),
        level=torch.where(update, level, state.level),
    )
    return state, (bound - shift).exp()


class FeedbackClip(Policy):
    """Self-tuning clipping: no threshold to choose (the rules: :mod:`.feedback`).

    Clips a step whose size jumps above 4× the run's typical size (harder the larger
    the jump; an LR jump counts), and, once the loss diverges, caps the size at twice
    the typical one, halving that cap at each new divergence and doubling it after 200
    healthy steps. Give it each step's loss and learning rate with :meth:`observe` before
    the guard decides; without them it only clips spikes of the bare norm. Works with
    :class:`~gradguard.Rewind`: a divergence it detects makes the rewinder restore the
    last snapshot, and its ceiling stays tightened (:meth:`rewound`).

    Args: the fields of :class:`FeedbackConfig`; the defaults are the measured ones
    (``benchmarks/efficacy``).
    """

    def __init__(self, **settings: Any) -> None:
        self.config = FeedbackConfig(**settings)
        self._state: FeedbackState | None = None
        self._loss: Tensor | None = None
        self._lr: float | None = None

    def _config(self) -> dict[str, Any]:
        return asdict(self.config)

    def observe(self, loss: Tensor | float | None = None, lr: float | None = None) -> None:
        """Give the loss and learning rate of the step about to be decided."""
        self._loss = None if loss is None else torch.as_tensor(loss)
        self._lr = None if lr is None else float(lr)

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        require_grads(stats, self)
        norm = stats.total_norm
        state = self._state if self._state is not None else initial_state(norm.device)
        loss = None if self._loss is None else self._loss.to(norm.device)
        self._state, threshold = feedback_clip(state, norm, loss, self._lr, self.config)
        self._loss = None  # a loss is evidence about one step only
        return Decision(scale=clip_coefficient(threshold, norm.float()), threshold=threshold)

    @property
    def divergences(self) -> Tensor:
        """Loss divergences detected so far (0-d tensor; :class:`~gradguard.Rewind` reads it)."""
        return self._state.episodes if self._state is not None else torch.zeros(())

    def rewound(self, previous: dict[str, Any]) -> None:
        """After a rewind: keep the lesson, a ceiling ``backoff`` × tighter than before it."""
        if not previous:
            return
        before = FeedbackState(**previous)
        base = torch.where(
            torch.isfinite(before.ceiling),
            before.ceiling,
            torch.where(before.count > 0, before.level + math.log(self.config.first), math.inf),
        )
        lowered = base + math.log(self.config.backoff)
        state = self._state if self._state is not None else initial_state(before.ceiling.device)
        self._state = state._replace(
            ceiling=torch.minimum(state.ceiling, lowered), episodes=before.episodes.clone()
        )

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            return {}
        return {k: v.detach().clone() for k, v in self._state._asdict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self._state = None
            return
        missing = set(FeedbackState._fields) - set(state)
        if missing:
            raise KeyError(
                f"state_dict for FeedbackClip lacks {sorted(missing)}; was it saved from "
                "another policy?"
            )
        values = {k: torch.as_tensor(state[k], dtype=torch.float32) for k in FeedbackState._fields}
        self._state = FeedbackState(**{k: v.clone() for k, v in values.items()})

"""Compose policies: ``chain(SkipNonFinite(), ZClip())``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..ops import Ops
from ..stats import GradStats
from .base import Decision, Policy, StepInputs, require_grads


class Chain(Policy):
    """Run policies in order on the same inputs and compose their decisions.

    The pure form (:meth:`update`) carries a tuple of the policies' states; the stateful
    form (:meth:`decide`) lets each policy keep its own, so ``policies[i].state_dict()``
    stays meaningful.
    """

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("policies: chain() needs at least one policy")
        for index, policy in enumerate(policies):
            if not isinstance(policy, Policy):
                raise TypeError(
                    f"policies[{index}] must be a gradguard Policy, got {type(policy).__name__}"
                )
        self.policies = tuple(policies)

    @property
    def reads_weight_norm(self) -> bool:  # type: ignore[override]
        return any(policy.reads_weight_norm for policy in self.policies)

    @property
    def needs_loss(self) -> bool:  # type: ignore[override]
        return any(policy.needs_loss for policy in self.policies)

    def init(self, inputs: StepInputs, xp: Ops) -> tuple[Any, ...]:
        return tuple(policy.init(inputs, xp) for policy in self.policies)

    def update(
        self, state: tuple[Any, ...], inputs: StepInputs, xp: Ops
    ) -> tuple[Decision, tuple[Any, ...]]:
        decision, states = None, []
        for policy, own in zip(self.policies, state):
            step, own = policy.update(own, inputs, xp)
            decision = step if decision is None else decision.then(step, xp)
            states.append(own)
        assert decision is not None  # a chain holds at least one policy
        return decision, tuple(states)

    def decide(
        self, inputs: StepInputs | GradStats, params: Sequence[Tensor] = (), **extra: Any
    ) -> Decision:
        if isinstance(inputs, GradStats):
            inputs = StepInputs.from_stats(inputs, params, **extra)
        require_grads(inputs, self)
        return self._decide(inputs)

    def _decide(self, inputs: StepInputs) -> Decision:
        decision = None
        for policy in self.policies:
            if type(policy).decide is Policy.decide:
                step = policy._decide(inputs)  # checked once, here
            else:  # a policy that decides its own way (an older custom policy)
                step = policy.decide(inputs, inputs.params).in_library(inputs.xp)
            decision = step if decision is None else decision.then(step, inputs.xp)
        assert decision is not None
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {str(i): p.state_dict() for i, p in enumerate(self.policies)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.policies):
            raise ValueError(
                f"state_dict holds {len(state)} policies but this chain has {len(self.policies)}"
            )
        for i, policy in enumerate(self.policies):
            if str(i) not in state:
                raise KeyError(f"state_dict for chain lacks policy {i}; was it saved from another?")
            policy.load_state_dict(state[str(i)])

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(p) for p in self.policies) + ")"


def chain(*policies: Policy) -> Chain:
    """Compose ``policies``: scales multiply, skips combine, transforms run in order."""
    return Chain(*policies)


def default_policy() -> Chain:
    """What :class:`~gradguard.Guard` uses when given no policy.

    Skip steps with non-finite gradients, then :class:`~gradguard.FeedbackClip`: no
    threshold to choose; it clips update-size spikes against the run's own typical size
    and, given the loss (``guard.step(optimizer, loss=loss)``), caps updates while the
    loss diverges and, under SGD, from the first step, caps steps that would carry the
    weights further than half their norm and overshoot the loss. (Until this release the
    default was ``ZClip(warmup_max_norm=10)``, which clips for good a norm that rises
    faster than its statistics follow.)
    """
    from .feedback import FeedbackClip
    from .skip import SkipNonFinite

    return chain(SkipNonFinite(), FeedbackClip())

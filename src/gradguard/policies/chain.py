"""Compose policies: ``chain(SkipNonFinite(), ZClip())``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..stats import GradStats
from .base import Decision, Policy


class Chain(Policy):
    """Run policies in order on the same statistics and compose their decisions."""

    def __init__(self, *policies: Policy) -> None:
        if not policies:
            raise ValueError("policies: chain() needs at least one policy")
        for index, policy in enumerate(policies):
            if not isinstance(policy, Policy):
                raise TypeError(
                    f"policies[{index}] must be a gradguard Policy, got {type(policy).__name__}"
                )
        self.policies = tuple(policies)

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        decision = Decision()
        for policy in self.policies:
            decision = decision.then(policy.decide(stats, params))
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {str(i): p.state_dict() for i, p in enumerate(self.policies)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.policies):
            raise ValueError(
                f"state_dict holds {len(state)} policies but this chain has {len(self.policies)}"
            )
        for i, policy in enumerate(self.policies):
            policy.load_state_dict(state[str(i)])

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(p) for p in self.policies) + ")"


def chain(*policies: Policy) -> Chain:
    """Compose ``policies``: scales multiply, skips combine, transforms run in order."""
    return Chain(*policies)


def default_policy() -> Chain:
    """What :class:`~gradguard.Guard` uses when given no policy.

    Skip steps with non-finite gradients, and clip norm spikes with ZClip, whose
    unclipped warm-up is capped at 10 (the top of the healthy range in the seeds).
    """
    from .adaptive import ZClip
    from .skip import SkipNonFinite

    return chain(SkipNonFinite(), ZClip(warmup_max_norm=10.0))

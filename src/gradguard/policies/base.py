"""The policy contract: from one step's statistics to a :class:`Decision`.

A policy is a small object with explicit state, in the spirit of optax's gradient
transformations: ``decide(stats, params)`` returns device tensors (no host sync)
and updates the policy's own state; ``state_dict()``/``load_state_dict()`` make a
resumed run take the same decisions. Policies are testable on plain tensors: build
a :class:`~gradguard.GradStats` with :func:`~gradguard.measure` and call ``decide``.

Norms are measured once per step, before any policy acts. Decisions compose: global
and per-tensor scales multiply, skip flags are or-ed, and in-place transforms (value
clipping, AGC) run in chain order. Every policy only ever scales gradients down, so a
composed clip is never looser than any of its parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..schema import SkipReason
from ..stats import GradStats

#: An in-place gradient transformation: ``fn(params, grads)``.
Transform = Callable[[Sequence[Tensor], Sequence[Tensor]], None]


@dataclass
class Decision:
    """What to do with this step's gradients; every tensor is 0-d unless stated.

    Attributes:
        scale: multiplier for every gradient (global-norm clipping), or ``None``.
        tensor_scale: per-tensor multipliers, shape ``(n,)``, or ``None``.
        skip: boolean: leave parameters and optimizer state untouched this step.
        reason: :class:`SkipReason` code of the skip (meaningful where ``skip``).
        threshold: the norm threshold in force, for recording (``inf`` when none).
        transforms: in-place transformations, applied in order before the scales.
    """

    scale: Tensor | None = None
    tensor_scale: Tensor | None = None
    skip: Tensor | None = None
    reason: Tensor | None = None
    threshold: Tensor | None = None
    transforms: list[Transform] = field(default_factory=list)

    def then(self, other: Decision) -> Decision:
        """Compose with a decision taken after this one (see the module docstring)."""
        return Decision(
            scale=_combine(self.scale, other.scale, torch.mul),
            tensor_scale=_combine(self.tensor_scale, other.tensor_scale, torch.mul),
            skip=_combine(self.skip, other.skip, torch.logical_or),
            reason=_first_reason(self, other),
            threshold=_combine(self.threshold, other.threshold, torch.minimum),
            transforms=[*self.transforms, *other.transforms],
        )


def _combine(a: Tensor | None, b: Tensor | None, op: Callable[[Tensor, Tensor], Tensor]):
    if a is None:
        return b
    if b is None:
        return a
    return op(a, b)


def _first_reason(a: Decision, b: Decision) -> Tensor | None:
    if a.skip is None:
        return b.reason
    if b.skip is None:
        return a.reason
    assert a.reason is not None and b.reason is not None
    return torch.where(a.skip, a.reason, b.reason)


class Policy:
    """Base class: subclasses implement :meth:`decide` and declare their state.

    State lives in attributes listed in ``_state_names``: tensors (kept on the device
    of the gradients) or plain Python values. ``state_dict()`` copies them out.
    """

    _state_names: tuple[str, ...] = ()

    def decide(self, stats: GradStats, params: Sequence[Tensor]) -> Decision:
        """Decide this step and update the policy's state. Must not sync with the host."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """A copy of the policy's state (tensors cloned)."""
        state = {}
        for name in self._state_names:
            value = getattr(self, name)
            state[name] = value.detach().clone() if isinstance(value, Tensor) else value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`."""
        missing = set(self._state_names) - set(state)
        if missing:
            raise KeyError(
                f"state_dict for {type(self).__name__} lacks {sorted(missing)}; was it saved "
                "from another policy?"
            )
        for name in self._state_names:
            value = state[name]
            setattr(self, name, value.detach().clone() if isinstance(value, Tensor) else value)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({params})"

    def _config(self) -> dict[str, Any]:
        return {}


def require_grads(stats: GradStats, policy: Policy) -> None:
    """Raise when a policy is fed no gradients at all."""
    if len(stats) == 0:
        raise ValueError(
            f"{type(policy).__name__}.decide got no gradients: every parameter's .grad is None. "
            "Call loss.backward() before the guard step, and check requires_grad."
        )


def reason_tensor(reason: SkipReason, like: Tensor) -> Tensor:
    """A 0-d int tensor holding ``reason`` on ``like``'s device."""
    return torch.full((), int(reason), dtype=torch.int8, device=like.device)


def finite_or(value: Tensor, fallback: Tensor) -> Tensor:
    """``value`` where finite, else ``fallback``: keeps NaN/inf out of policy histories."""
    return torch.where(torch.isfinite(value), value, fallback)

"""Clipping with fixed thresholds: global norm, value, per-tensor norm, unit-wise (AGC)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .. import _foreach
from .. import _validate as check
from ..functional import adaptive_clip_grad_
from ..ops import Ops, clip_coefficient
from .base import Decision, Policy, StepInputs


def _check_norm_type(policy: Policy, wanted: float, inputs: StepInputs) -> None:
    if inputs.norm_type != wanted:
        raise ValueError(
            f"norm_type: {type(policy).__name__} clips the {wanted}-norm but the gradients were "
            f"measured with norm_type={inputs.norm_type}; give the guard the same norm_type"
        )


class Monitor(Policy):
    """Measure and record only: never clips, never skips (watch a run before guarding it)."""

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        return Decision(), state


class ClipNorm(Policy):
    """Scale all gradients together so their global norm is at most ``max_norm``.

    Same coefficient as :func:`torch.nn.utils.clip_grad_norm_`:
    ``min(max_norm / (‖g‖ + 1e-6), 1)``; the direction of the update is kept.
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0) -> None:
        self.max_norm = check.non_negative("max_norm", max_norm, float32=True)
        self.norm_type = check.norm_type(norm_type)

    def _config(self):
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        _check_norm_type(self, self.norm_type, inputs)
        total = inputs.total_norm
        decision = Decision(
            scale=clip_coefficient(xp, self.max_norm, total),
            threshold=xp.scalar(self.max_norm, total),
        )
        return decision, state


class ClipValue(Policy):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (may change direction)."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check.non_negative("clip_value", clip_value, float32=True)

    def _config(self):
        return {"clip_value": self.clip_value}

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        limit = self.clip_value

        def clamp(_params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
            for group in _foreach.groups(grads):
                _foreach.clamp_(group, -limit, limit)

        return Decision(transforms=[clamp]), state


class ClipTensorNorm(Policy):
    """Clip each gradient tensor to norm ``max_norm`` on its own (Paddle's ``ClipGradByNorm``)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = check.non_negative("max_norm", max_norm, float32=True)

    def _config(self):
        return {"max_norm": self.max_norm}

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        return Decision(tensor_scale=clip_coefficient(xp, self.max_norm, inputs.norms)), state


class AGC(Policy):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    Each output unit's gradient is limited to ``clip_factor · max(‖w_unit‖, eps)``;
    see :func:`gradguard.adaptive_clip_grad_`. The paper leaves the final classifier
    layer unclipped: pass ``exclude=("fc",)`` style name prefixes to do the same.
    """

    def __init__(
        self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ()
    ) -> None:
        self.clip_factor = check.positive("clip_factor", clip_factor, float32=True)
        self.eps = check.non_negative("eps", eps, float32=True)
        self.exclude = tuple(exclude)

    def _config(self):
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude": self.exclude}

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        keep = _kept(inputs.names, inputs.count, self.exclude)

        def agc(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
            chosen = [p for p, k in zip(params, keep) if k]
            if chosen:
                adaptive_clip_grad_(chosen, self.clip_factor, self.eps)

        return Decision(transforms=[agc]), state


@functools.lru_cache(maxsize=16)
def _kept(names: tuple[str, ...] | None, count: int, exclude: tuple[str, ...]) -> tuple[bool, ...]:
    if not names or not exclude:
        return (True,) * count
    return tuple(not name.startswith(exclude) for name in names)

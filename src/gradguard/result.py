"""``StepResult``: what one guarded step measured and decided."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .ops import NUMPY, Array, Ops
from .policies.base import Decision, StepInputs
from .schema import SkipReason
from .stats import GradStats


class StepResult:
    """What one guarded step did.

    The decision is taken where the gradients live: on an accelerator every field below
    is a device tensor and reading it syncs; on the CPU the numbers are already on the
    host and the tensors are made when first read.

    Attributes:
        step: the guard's step counter (0-based) for this step.
        total_norm: global gradient norm before any clipping (float32 tensor).
        clipped_norm: global norm after clipping. After an element-wise transform
            (ClipValue, AGC, GradientNoise) it takes one more pass over the gradients, paid
            only when a recorder is attached; without one it is NaN in that case.
        clip_coef: ``clipped_norm / total_norm`` (1.0 when nothing was clipped).
        threshold: the norm threshold in force (``inf`` when none).
        skipped: True when the optimizer step was skipped (a bool tensor).
        reason: a :class:`~gradguard.schema.SkipReason` code (an int8 tensor).
        stats: the step's :class:`GradStats` (pre-clip per-tensor norms, names).
        inputs: the :class:`~gradguard.policies.StepInputs` the policy saw.
        decision: the policy's :class:`~gradguard.policies.Decision`.
    """

    def __init__(
        self,
        step: int,
        stats: GradStats,
        inputs: StepInputs,
        decision: Decision,
        skip: Array,
        reason: Array,
        clipped_norm: Array,
        clip_coef: Array,
        threshold: Array,
        may_skip: bool,
    ) -> None:
        self.step = step
        self.stats = stats
        self.inputs = inputs
        self.decision = decision
        self.xp: Ops = inputs.xp
        self._values = {
            "clipped_norm": clipped_norm,
            "clip_coef": clip_coef,
            "threshold": threshold,
            "skipped": skip,
            "reason": reason,
        }
        #: Whether the step was skipped, once the host knows (``None`` until then).
        self.skipped_on_host: bool | None = None
        if self.xp is NUMPY or not may_skip:
            self.skipped_on_host = bool(skip) if self.xp is NUMPY else False
        self.reported = False

    # -- the recorded numbers, as tensors --------------------------------------------------
    @property
    def total_norm(self) -> Tensor:
        total = self.stats.total_norm
        return total if total.dtype == torch.float32 else total.float()

    @property
    def clipped_norm(self) -> Tensor:
        return self._tensor("clipped_norm", torch.float32)

    @property
    def clip_coef(self) -> Tensor:
        return self._tensor("clip_coef", torch.float32)

    @property
    def threshold(self) -> Tensor:
        return self._tensor("threshold", torch.float32)

    @property
    def skipped(self) -> Tensor:
        return self._tensor("skipped", torch.bool)

    @property
    def reason(self) -> Tensor:
        return self._tensor("reason", torch.int8)

    def _tensor(self, name: str, dtype: torch.dtype) -> Tensor:
        value = self._values[name]
        if not isinstance(value, Tensor):  # a host number: the tensor is made once, on demand
            value = torch.tensor(np.asarray(value).item(), dtype=dtype)
            self._values[name] = value
        return value

    def host_value(self, name: str) -> Any:
        """A recorded field as the policy left it (a host number on the CPU path)."""
        return self._values[name]

    @property
    def scale(self) -> Array | None:
        """The global clip coefficient (``None`` when no global clip applies)."""
        return self.decision.scale

    # -- reading back ----------------------------------------------------------------------
    @property
    def reason_label(self) -> str:
        """Why the step was skipped, as text (``"none"`` when it was not). Syncs."""
        if not self.is_skipped():
            return "none"
        return SkipReason(int(self._values["reason"])).label

    def is_skipped(self) -> bool:
        """Whether the step was skipped (syncs once on a device, when the step could skip)."""
        if self.skipped_on_host is None:
            self.skipped_on_host = bool(self._values["skipped"])
        return self.skipped_on_host

    def nonfinite_names(self) -> list[str]:
        """Parameters whose gradient held NaN or inf this step. Syncs."""
        return self.stats.nonfinite_names()

    def __repr__(self) -> str:
        total = float(self.stats.total_norm)
        coef = float(np.asarray(self._tensor("clip_coef", torch.float32).cpu()))
        return (
            f"StepResult(step={self.step}, total_norm={total:.4g}, clip_coef={coef:.4g}, "
            f"skipped={self.is_skipped()}, reason={self.reason_label!r})"
        )


def outcome(inputs: StepInputs, decision: Decision, transformed_norm: Any) -> tuple[Array, ...]:
    """``(clipped_norm, clip_coef, threshold)`` of a decision, in the decision's library.

    ``transformed_norm`` is the norm measured after in-place transforms (``None`` when not
    measured: the clipped norm is then NaN). With only a global clip, ``clip_coef`` is the
    coefficient applied; otherwise the ratio of the norms after and before.
    """
    xp = inputs.xp
    total = inputs.total_norm
    ratio = True
    if decision.transforms:
        if transformed_norm is None:
            clipped = xp.scalar(math.nan, total)
        else:
            clipped = xp.f32(xp.asarray(transformed_norm, total))
    elif decision.tensor_scale is not None:
        clipped = xp.vector_norm(inputs.norms * decision.tensor_scale, inputs.norm_type)
    else:
        clipped, ratio = total, False
    scale = decision.scale
    if scale is not None:
        clipped = clipped * scale
    if ratio:
        coef = xp.where(total > 0, clipped / xp.where(total > 0, total, 1.0), 1.0)
    elif scale is not None:
        coef = xp.where(total > 0, scale, 1.0)
    else:
        coef = xp.scalar(1.0, total)
    threshold = decision.threshold
    if threshold is None:
        threshold = xp.scalar(math.inf, total)
    return clipped, coef, threshold


def skip_and_reason(
    xp: Ops, decision: Decision, found_inf: Any, like: Any
) -> tuple[Any, Any, bool]:
    """The step's skip flag and reason code, with an AMP overflow folded in."""
    skip, reason = decision.skip, decision.reason
    none = xp.code(int(SkipReason.NONE), like)
    if skip is not None:
        reason = xp.where(skip, reason, none)
    if found_inf is not None:
        overflow = xp.asarray(found_inf, like) > 0
        amp = xp.code(int(SkipReason.AMP_OVERFLOW), like)
        reason = xp.where(overflow, amp, none if reason is None else reason)
        skip = overflow if skip is None else skip | overflow
    if skip is None:
        return xp.flag(False, like), none, False
    return skip, reason, True

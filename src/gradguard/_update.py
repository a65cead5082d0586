"""The optimizer side of a guarded step: step it, fold the step into its fused kernel, or
skip it so that parameters and optimizer state stay exactly as they were.

A skip known on the host (always on the CPU, where the decision is host math) simply
does not call ``optimizer.step()``. On an accelerator a fused torch optimizer takes the
clip coefficient as ``grad_scale`` and the skip flag as ``found_inf``, so neither needs a
host sync; but a fused kernel creates state before it honours ``found_inf`` (fused SGD
allocates its momentum buffer with ``empty_like``, fused Adam zero moments), so the skip
is folded only once every parameter has its state. Until then, and for every other
optimizer, the skip costs the one host sync the guard allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _amp, _warn
from .ops import NUMPY
from .result import StepResult


def supports_folding(optimizer: torch.optim.Optimizer) -> bool:
    """Fused torch optimizers read ``grad_scale``/``found_inf`` attributes in their step."""
    return bool(optimizer.defaults.get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )


def state_ready(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> bool:
    """Whether a skipped step of this fused optimizer would create no state."""
    if isinstance(optimizer, torch.optim.SGD) and all(
        g.get("momentum", 0) == 0 for g in optimizer.param_groups
    ):
        return True  # plain SGD keeps no state
    state = optimizer.state
    return all(p in state and state[p] for p in params)


class StateReadiness:
    """:func:`state_ready`, remembered: checking every parameter's state is a Python loop
    over the parameters each step. Once ready, it stays so while the optimizer, its state
    dict (``load_state_dict`` replaces it) and that dict's size are the same, for the
    guard's whole parameter list (a step where some gradients are missing checks again)."""

    def __init__(self) -> None:
        self._key: tuple[int, int, int] | None = None

    def __call__(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], every: bool
    ) -> bool:
        key = (id(optimizer), id(optimizer.state), len(optimizer.state))
        if every and key == self._key:
            return True
        ready = state_ready(optimizer, params)
        self._key = key if ready and every else None
        return ready


def warn_if_private(optimizer: Any) -> None:
    """Warn when ``optimizer`` is (or wraps) an Opacus ``DPOptimizer``.

    A guard measures the exact batch gradient, which differential privacy does not cover,
    and would clip it outside DP-SGD's per-example clip.
    """
    layer, depth = optimizer, 0
    while layer is not None and depth < 8:
        if type(layer).__module__.split(".", 1)[0] == "opacus":
            _warn.warn(
                f"gradguard: the optimizer is an Opacus {type(layer).__name__}: a Guard would "
                "record the exact, non-private batch gradient norms (not covered by epsilon) "
                "and clip outside DP-SGD. For DP runs use gradguard.privacy "
                "(PerSampleMonitor, AdaptiveQuantileClip)."
            )
            return
        inner = getattr(layer, "optimizer", None) or getattr(layer, "original_optimizer", None)
        layer, depth = (inner if inner is not layer else None), depth + 1


def learning_rate(optimizer: Any) -> Tensor | float | None:
    """The learning rate of the first parameter group (a number, a 0-d tensor, or None)."""
    groups = getattr(optimizer, "param_groups", None) or []
    lr = groups[0].get("lr") if groups else None
    if isinstance(lr, Tensor):
        return lr.detach() if lr.numel() == 1 else None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def sgd_step_gain(optimizer: Any) -> float:
    """How far a persistent gradient moves the weights, in steps of ``lr × g``: 0.0 when
    the optimizer's step is not the learning rate times the gradient, else ``torch.optim.SGD``'s
    momentum gain ``(1 - dampening) / (1 - momentum)`` of the first parameter group (1.0
    without momentum, 10 at momentum 0.9)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 0.0
    group = optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    dampening = float(group.get("dampening", 0.0) or 0.0)
    if not (0.0 < momentum < 1.0 and 0.0 <= dampening < 1.0):
        return 1.0
    return (1.0 - dampening) / (1.0 - momentum)


def run(
    optimizer: torch.optim.Optimizer,
    result: StepResult,
    *,
    fold: bool,
    scaler: torch.amp.GradScaler | None,
) -> bool | None:
    """Step ``optimizer`` unless ``result`` says skip.

    ``fold``: the optimizer is fused and the global clip coefficient was left for its
    ``grad_scale`` (see the module docstring). Returns whether the step was skipped when
    the host knows it, ``None`` when the device decided (folded into ``found_inf``).
    """
    skipped = result.skipped_on_host
    if skipped is None and not fold:
        skipped = result.is_skipped()  # the one host sync: a possible skip, plain optimizer
    if skipped:
        if scaler is not None:
            _amp.mark_stepped(scaler, optimizer)
        return True
    if not fold:
        optimizer.step()
    else:
        _fused_step(optimizer, result, skip_on_device=skipped is None)
    if scaler is not None:
        _amp.mark_stepped(scaler, optimizer)
    return skipped


def _fused_step(optimizer: torch.optim.Optimizer, result: StepResult, skip_on_device: bool) -> None:
    scale = result.scale
    try:
        if scale is not None:
            # Fused kernels divide the gradients by grad_scale: fold the coefficient in.
            if result.xp is NUMPY:
                if scale < 1.0:  # a host number: nothing to fold when nothing is clipped
                    optimizer.grad_scale = torch.tensor(
                        float(np.reciprocal(scale)), dtype=torch.float32
                    )
            else:
                optimizer.grad_scale = torch.reciprocal(scale)
        if skip_on_device:
            optimizer.found_inf = result.skipped.float()
        optimizer.step()
    finally:
        optimizer.__dict__.pop("grad_scale", None)
        optimizer.__dict__.pop("found_inf", None)

"""A policy's device update as one compiled graph (``torch.compile``).

On an accelerator every 0-d torch operation of a policy's update is a kernel launch
of a few microseconds of host time: FeedbackClip's update is some 160 of them, more
than the rest of a guarded step. Compiled, the same lines run as one fused kernel.

The update is traced once per policy type and settings (the settings are constants of
the graph; a learning rate given as a number is passed as a tensor, so a schedule does
not recompile). Should compiling fail (no compiler for the device, an update the
tracer cannot follow), the policy runs op by op from then on, after one warning: the
update is pure, so the step is decided as if nothing had been tried.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import Tensor

from . import _warn
from .ops import TORCH
from .policies.base import Decision, Policy
from .policies.inputs import StepInputs

_failed: set[type] = set()  # policy types whose compile failed: op by op from then on
_compiled: Any = None


def by_default(device: torch.device) -> bool:
    """Whether a guard compiles by default on ``device``: CUDA, with Triton installed."""
    return device.type == "cuda" and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    """Triton generates Inductor's CUDA kernels; where Dynamo cannot run (some Python
    versions), nothing is compiled either."""
    return importlib.util.find_spec("triton") is not None and torch._dynamo.is_dynamo_supported()


def update(policy: Policy, state: Any, inputs: StepInputs) -> tuple[Decision, Any]:
    """``policy.update(state, inputs, TORCH)``, compiled; the same result up to rounding."""
    kind = type(policy)
    if kind in _failed:
        return policy.update(state, inputs, TORCH)
    # numbers that change during a run (an LR schedule; momentum, and so SGD's gain,
    # under OneCycleLR) would be constants of the graph: they go in as tensors
    device = inputs.total_norm.device
    lr, gain = inputs.lr, inputs.step_gain
    if isinstance(lr, (int, float)):
        lr = torch.full((), float(lr), dtype=torch.float32, device=device)
    if inputs.weight_norm is not None:
        gain = torch.full((), float(gain), dtype=torch.float32, device=device)
    try:
        arrays, new_state = _function()(
            policy,
            _unaliased(state),
            inputs.total_norm,
            inputs.norms,
            inputs.loss,
            lr,
            inputs.weight_norm,
            gain,
            inputs.norm_type,
        )
    except Exception as error:  # any failure to compile: decide op by op
        _failed.add(kind)
        cause = getattr(error, "inner_exception", None) or error.__cause__ or error
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        _warn.warn(
            f"gradguard: compiling {kind.__name__}'s device update failed "
            f"({type(cause).__name__}: {first_line}); it runs op by op from now on "
            "(Guard(compile=False) skips the attempt)"
        )
        return policy.update(state, inputs, TORCH)
    return Decision.from_arrays((), arrays), new_state


def _unaliased(state: Any) -> Any:
    """``state`` with no tensor in two fields (an initial state shares its zeros): the
    graph is traced for distinct inputs, and aliased ones would trace it again."""
    if not isinstance(state, tuple):
        return state
    seen: set[int] = set()
    fields = []
    for value in state:
        if isinstance(value, Tensor):
            if id(value) in seen:
                value = value.clone()
            seen.add(id(value))
        fields.append(value)
    return type(state)(*fields) if hasattr(state, "_fields") else tuple(fields)


def _function() -> Any:
    global _compiled
    if _compiled is None:
        # Not fullgraph: where tracing is off (under a TorchDispatchMode, say) the update
        # runs as written instead of failing; tests check that it traces as one graph.
        _compiled = torch.compile(_pure_update, dynamic=False)
    return _compiled


def _pure_update(
    policy: Policy,
    state: Any,
    total_norm: Tensor,
    norms: Tensor,
    loss: Tensor | None,
    lr: Tensor | None,
    weight_norm: Tensor | None,
    step_gain: Tensor | float,
    norm_type: float,
) -> tuple[tuple[Any, ...], Any]:
    inputs = StepInputs(
        total_norm,
        norms,
        TORCH,
        loss=loss,
        lr=lr,
        norm_type=norm_type,
        weight_norm=weight_norm,
        step_gain=step_gain,
    )
    decision, state = policy.update(state, inputs, TORCH)
    return decision.arrays(), state

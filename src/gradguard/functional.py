"""Gradient clipping functions.

The first four are drop-ins for ``torch.nn.utils``: same signatures, defaults,
return values and errors, bit-identical results, and the same ``norm_type`` values
(any number but NaN: ``-inf``, 0 and negative orders too). Two deliberate differences,
both on inputs torch silently mishandles: a negative or NaN ``max_norm`` /
``clip_value`` raises ``ValueError`` (torch would flip or NaN the gradients), and a
sparse gradient raises a ``TypeError`` naming the parameter (torch raises
``NotImplementedError`` from deep inside); and ``clip_grad_value_`` on parameters
none of which has a gradient does nothing (torch raises an internal error).
``clip_grad_norm_`` can also hand back the :class:`~gradguard.GradStats` it
computed, so per-layer norms cost nothing.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import Literal, overload

import torch
from torch import Tensor

from . import _foreach, ops
from . import _validate as check
from ._params import ParamsLike, check_grad, grads_with_names
from .stats import GradStats, measure_grads

__all__ = [
    "adaptive_clip_grad_",
    "clip_coefficient",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_tensor_norms_",
    "get_total_norm",
]

_EPS = 1e-6  # the same guard torch adds to the norm before dividing


def clip_coefficient(max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)`` as a device tensor: no host sync."""
    return ops.clip_coefficient(ops.TORCH, max_norm, total_norm)


def _nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


@torch.no_grad()
def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Norm of ``tensors`` viewed as one vector; drop-in for ``torch.nn.utils.get_total_norm``."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensors[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
        check_grad(tensor, f"tensors[{index}]")
    p = check.norm_type(norm_type, like_torch=True)
    total = measure_grads(tensors, p, foreach=foreach).total_norm
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise _nonfinite_error(p)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: ParamsLike,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, in place.

    Drop-in for ``torch.nn.utils.clip_grads_with_norm_``.
    """
    limit = check.non_negative("max_norm", max_norm)
    grads = grads_with_names(parameters).grads
    if grads:
        _foreach.scale_(grads, clip_coefficient(limit, total_norm), foreach)


@overload
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float | str = ...,
    error_if_nonfinite: bool = ...,
    foreach: bool | None = ...,
    *,
    return_stats: Literal[False] = ...,
) -> Tensor: ...
@overload
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float | str = ...,
    error_if_nonfinite: bool = ...,
    foreach: bool | None = ...,
    *,
    return_stats: Literal[True],
) -> GradStats: ...
@torch.no_grad()
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    return_stats: bool = False,
) -> Tensor | GradStats:
    """Clip the global gradient norm in place; drop-in for ``torch.nn.utils.clip_grad_norm_``.

    Returns the total norm before clipping, or with ``return_stats=True`` the full
    :class:`GradStats` (per-tensor norms, names, non-finite flags) of the pre-clip gradients.
    """
    limit = check.non_negative("max_norm", max_norm)
    p = check.norm_type(norm_type, like_torch=True)
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    found = grads_with_names(parameters)
    stats = measure_grads(found.grads, p, names=found.names, foreach=foreach)
    total = stats.total_norm
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise _nonfinite_error(p)
    if found.grads:
        _foreach.scale_(found.grads, clip_coefficient(limit, total), foreach)
    return stats if return_stats else total


@torch.no_grad()
def clip_grad_value_(
    parameters: ParamsLike,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, in place.

    Drop-in for ``torch.nn.utils.clip_grad_value_``. Unlike norm clipping this can
    change the gradient's direction.
    """
    limit = check.non_negative("clip_value", clip_value)
    for group in _foreach.groups(grads_with_names(parameters).grads, foreach):
        _foreach.clamp_(group, -limit, limit)


@torch.no_grad()
def clip_tensor_norms_(
    parameters: ParamsLike,
    max_norm: float,
    norm_type: float | str = 2.0,
    foreach: bool | None = None,
) -> GradStats:
    """Clip each gradient tensor to norm ``max_norm`` on its own, in place.

    The per-tensor counterpart of :func:`clip_grad_norm_` (PaddlePaddle's
    ``ClipGradByNorm``): ``g ← g · min(max_norm / (‖g‖ + 1e-6), 1)`` for each tensor.
    Returns the pre-clip statistics.
    """
    limit = check.non_negative("max_norm", max_norm)
    p = check.norm_type(norm_type)
    found = grads_with_names(parameters)
    stats = measure_grads(found.grads, p, names=found.names, foreach=foreach)
    if found.grads:
        _foreach.scale_per_tensor_(found.grads, clip_coefficient(limit, stats.norms), foreach)
    return stats


def _unitwise_norm(x: Tensor, norm_type: float) -> Tensor:
    """Norm per output unit: over dims 1..n for weights laid out (out, in, ...)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: ParamsLike,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float | str = 2.0,
) -> None:
    """Unit-wise adaptive gradient clipping (AGC), in place.

    Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image
    Recognition Without Normalization": for each output unit ``i`` of each weight,
    ``g_i ← g_i · min(λ · max(‖w_i‖, eps) / ‖g_i‖, 1)`` with ``λ = clip_factor``.
    Units are rows of the weight (PyTorch lays weights out as (out, in, ...)), so norms
    reduce over dims 1..n; biases and other vectors are treated as one unit.
    """
    factor = check.positive("clip_factor", clip_factor)
    floor = check.non_negative("eps", eps)
    p = check.norm_type(norm_type)
    found = grads_with_names(parameters)
    for param, grad in zip(found.params, found.grads):
        if grad.is_complex():
            raise TypeError("parameters: adaptive_clip_grad_ does not support complex gradients")
        max_norm = _unitwise_norm(param.detach(), p).clamp_(min=floor).mul_(factor)
        grad_norm = _unitwise_norm(grad, p).clamp_(min=_EPS)
        grad.mul_((max_norm / grad_norm).clamp_(max=1.0).to(grad.dtype))

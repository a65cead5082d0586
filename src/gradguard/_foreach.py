"""One place for the device/dtype grouping and foreach-or-loop dispatch.

``torch.nn.utils.clip_grad`` repeats this dispatch in each function; here it is
written once and every operation goes through :func:`groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)


@dataclass(frozen=True)
class Group:
    """Tensors sharing a device and dtype, their positions in the input, and the path to use."""

    device: torch.device
    tensors: list[Tensor]
    indices: list[int]
    use_foreach: bool


def groups(tensors: Sequence[Tensor], foreach: bool | None = None) -> list[Group]:
    """Group ``tensors`` by (device, dtype) exactly as torch's clipping functions do.

    ``foreach=None`` picks the foreach path where the device supports it;
    ``foreach=True`` raises torch's own error where it does not.
    """
    if not tensors:
        return []
    grouped = _group_tensors_by_device_and_dtype(
        [list(tensors)],
        with_indices=True,  # type: ignore[list-item]
    )
    result = []
    for (device, _), ([device_tensors], indices) in grouped.items():
        if foreach is None:
            use = _has_foreach_support(device_tensors, device)  # type: ignore[arg-type]
        elif foreach:
            if not _device_has_foreach_support(device):
                raise RuntimeError(
                    f"foreach=True was passed, but can't use the foreach API on {device.type} "
                    "tensors"
                )
            use = True
        else:
            use = False
        result.append(Group(device, device_tensors, list(indices), use))  # type: ignore[arg-type]
    return result


def norms(group: Group, norm_type: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    """Per-tensor norms of one group (0-d tensors), in the group's order."""
    if group.use_foreach:
        if dtype is None:
            return list(torch._foreach_norm(group.tensors, norm_type))
        return list(torch._foreach_norm(group.tensors, norm_type, dtype=dtype))
    return [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in group.tensors]


def mul_(group: Group, factor: Tensor | Sequence[Tensor]) -> None:
    """Multiply every tensor of the group in place by one factor or one factor each."""
    if isinstance(factor, Tensor):
        factor = factor.to(group.device)
        if group.use_foreach:
            torch._foreach_mul_(group.tensors, factor)
        else:
            for t in group.tensors:
                t.mul_(factor)
        return
    if group.use_foreach:
        torch._foreach_mul_(group.tensors, list(factor))
    else:
        for t, f in zip(group.tensors, factor):
            t.mul_(f)


def clamp_(group: Group, low: float, high: float) -> None:
    """Clamp every tensor of the group in place to ``[low, high]``."""
    if group.use_foreach:
        torch._foreach_clamp_min_(group.tensors, low)
        torch._foreach_clamp_max_(group.tensors, high)
    else:
        for t in group.tensors:
            t.clamp_(min=low, max=high)

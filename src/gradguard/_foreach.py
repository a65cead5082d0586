"""One place for the device/dtype grouping and foreach-or-loop dispatch.

``torch.nn.utils.clip_grad`` repeats this dispatch in each function; here it is
written once and every operation on a list of gradients goes through :func:`groups`:
measuring (:func:`stacked_norms`, :func:`max_abs`, :func:`zero_fraction`) and scaling
(:func:`scale_`, :func:`scale_per_tensor_`, :func:`clamp_`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Group(NamedTuple):
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
    # torch's grouping, without the no_grad wrapper torch puts around it (nothing here
    # records autograd history); its cost is most of a small model's measurement.
    grouped = torch._C._group_tensors_by_device_and_dtype([list(tensors)], True)
    result = []
    for (device, _), ([device_tensors], indices) in grouped.items():
        if foreach is None:
            use = _device_supports(device) and all(type(t) is Tensor for t in device_tensors)
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


@functools.lru_cache(maxsize=16)
def _device_supports(device: torch.device) -> bool:
    return _device_has_foreach_support(device)


def norms(group: Group, norm_type: float, dtype: torch.dtype | None = None) -> list[Tensor]:
    """Per-tensor norms of one group (0-d tensors), in the group's order."""
    if group.use_foreach:
        if dtype is None:
            return list(torch._foreach_norm(group.tensors, norm_type))
        return list(torch._foreach_norm(group.tensors, norm_type, dtype=dtype))
    return [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in group.tensors]


def stacked_norms(
    tensors: Sequence[Tensor],
    norm_type: float,
    foreach: bool | None = None,
    accumulate: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-tensor norms as one vector on ``device`` (default: the first tensor's).

    Returns ``(in_input_order, in_group_order)``: the second is the vector
    ``torch.nn.utils.get_total_norm`` reduces (with ``accumulate=None``, which measures
    each tensor in its own dtype, the total taken from it is then bit-identical).
    Otherwise fp16/bf16 tensors are measured in ``accumulate`` and every norm is given in
    the widest dtype present, so mixed fp64 and bf16 gradients share one vector.
    """
    device = tensors[0].device if device is None else device
    parts = groups(tensors, foreach)
    flat: list[Tensor] = []
    for group in parts:
        low = accumulate is not None and group.tensors[0].dtype in _LOW_PRECISION
        flat.extend(norms(group, norm_type, accumulate if low else None))
    if accumulate is not None and len(parts) > 1:
        common = functools.reduce(torch.promote_types, (n.dtype for n in flat))
        flat = [n.to(device, common) for n in flat]
    if len(parts) == 1 and parts[0].device == device:
        stacked = torch.stack(flat)  # the usual case: nothing to move
        return stacked, stacked
    stacked = torch.stack([n.to(device) for n in flat])
    if len(parts) == 1:
        return stacked, stacked
    order = torch.tensor([i for g in parts for i in g.indices], dtype=torch.long, device=device)
    return torch.empty_like(stacked).index_copy_(0, order, stacked), stacked


def max_abs(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor max ``|t|`` on ``device`` (aminmax: one read; ``ord=inf`` norms were ~5x
    slower on CPU)."""
    values = []
    for t in tensors:
        if t.numel() == 0:
            values.append(torch.zeros((), device=t.device))
        elif t.is_complex():
            values.append(t.abs().amax().float())
        else:
            low, high = torch.aminmax(t)
            values.append(torch.maximum(high.float(), -low.float()))
    return torch.stack([v.to(device) for v in values])


def zero_counts(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor number of exact zeros (float64) on ``device``."""
    sizes = torch.tensor([t.numel() for t in tensors], device=device, dtype=torch.float64)
    return sizes - torch.stack([torch.count_nonzero(t).to(device) for t in tensors])


def mul_(group: Group, factor: Tensor | float | Sequence[Tensor]) -> None:
    """Multiply every tensor of the group in place by one factor or one factor each."""
    if isinstance(factor, Tensor):
        factor = factor.to(group.device)
    if isinstance(factor, (Tensor, float)):
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


def scale_(tensors: Sequence[Tensor], factor: Tensor, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by one 0-d ``factor`` (global-norm clipping)."""
    for group in groups(tensors, foreach):
        mul_(group, factor)


def scale_per_tensor_(
    tensors: Sequence[Tensor], factors: Tensor, foreach: bool | None = None
) -> None:
    """Multiply ``tensors[i]`` in place by ``factors[i]`` (per-tensor clipping)."""
    for group in groups(tensors, foreach):
        index = torch.tensor(group.indices, dtype=torch.long, device=factors.device)
        picked = factors.index_select(0, index).to(group.device).unbind()
        mul_(group, [f.to(t.dtype) for f, t in zip(picked, group.tensors)])


def clamp_(group: Group, low: float, high: float) -> None:
    """Clamp every tensor of the group in place to ``[low, high]``."""
    if group.use_foreach:
        torch._foreach_clamp_min_(group.tensors, low)
        torch._foreach_clamp_max_(group.tensors, high)
    else:
        for t in group.tensors:
            t.clamp_(min=low, max=high)

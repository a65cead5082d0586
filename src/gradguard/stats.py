"""One-pass gradient measurement: :func:`measure` and :class:`GradStats`.

The per-tensor norms that a global-norm clip has to compute anyway are kept as
the per-layer statistics, and a NaN or inf element makes its tensor's norm
non-finite, so locating bad gradients costs nothing more. Nothing in this
module synchronises with the host except the helpers documented to do so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import _foreach
from . import _validate as check
from ._params import ParamsLike, grads_with_names
from .distributed import has_dtensor, sharded_norms
from .layers import group_index


class LayerNorms(NamedTuple):
    """Norms combined per module: ``names[i]`` owns ``norms[i]`` (a device tensor)."""

    names: tuple[str, ...]
    norms: Tensor


@dataclass(frozen=True)
class HostStats:
    """A :class:`GradStats` copied to the host in one transfer: plain Python numbers."""

    total_norm: float
    norms: list[float]
    names: tuple[str, ...] | None
    max_abs: list[float] | None = None
    zero_fraction: list[float] | None = None

    @property
    def nonfinite_names(self) -> list[str]:
        """Names (or ``parameters[i]`` labels) of the tensors whose norm is NaN or inf."""
        labels = self.names or tuple(f"parameters[{i}]" for i in range(len(self.norms)))
        return [label for label, n in zip(labels, self.norms) if not math.isfinite(n)]


@dataclass(frozen=True, eq=False)
class GradStats:
    """Gradient statistics of one step; every tensor field stays on the device.

    Attributes:
        norms: per-tensor norms, shape ``(n,)``, in parameter order.
        total_norm: norm of all gradients viewed as one vector (0-d tensor), computed
            exactly as :func:`torch.nn.utils.get_total_norm` computes it.
        norm_type: the p of the p-norm (``inf`` allowed).
        names: parameter names when a module or ``named_parameters()`` was given.
        shapes: gradient shapes, aligned with ``norms``.
        max_abs: per-tensor max ``|g|`` when requested, else ``None``.
        zero_fraction: per-tensor fraction of exact zeros when requested, else ``None``.
        local_nonfinite: for DTensor gradients, this rank's 0-d flag: a local shard held
            NaN/inf before the all-reduce (``None`` for plain gradients).
    """

    norms: Tensor
    total_norm: Tensor
    norm_type: float
    names: tuple[str, ...] | None
    shapes: tuple[torch.Size, ...]
    max_abs: Tensor | None = None
    zero_fraction: Tensor | None = None
    local_nonfinite: Tensor | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nonfinite(self) -> Tensor:
        """Per-tensor boolean flags: ``True`` where a gradient holds a NaN or inf."""
        return ~torch.isfinite(self.norms)

    @property
    def any_nonfinite(self) -> Tensor:
        """0-d boolean tensor: the total norm is NaN or inf (a bad element, or overflow)."""
        return ~torch.isfinite(self.total_norm)

    def labels(self) -> tuple[str, ...]:
        """Parameter names, or ``parameters[i]`` when the input carried no names."""
        if self.names is not None:
            return self.names
        return tuple(f"parameters[{i}]" for i in range(len(self)))

    def nonfinite_names(self) -> list[str]:
        """Names of the parameters whose gradient is non-finite (one host sync)."""
        flags = self.nonfinite.tolist()
        return [label for label, bad in zip(self.labels(), flags) if bad]

    def by_module(self, depth: int | None = None) -> LayerNorms:
        """Combine per-tensor norms per owning module (the layer view).

        ``depth=None`` groups by the module that owns each parameter
        (``"encoder.0.attn.weight"`` → ``"encoder.0.attn"``); ``depth=k`` keeps the first
        ``k`` dotted components. Groups come in model order. The combined norm is the
        p-norm of the member norms, so it equals the norm of the module's gradients.
        """
        if depth is not None:
            check.positive_int("depth", depth)
        groups, positions = group_index(self.labels(), depth)
        index = _index_tensor(positions, self.norms.device)
        if math.isinf(self.norm_type):
            out = torch.zeros(len(groups), dtype=self.norms.dtype, device=self.norms.device)
            out.scatter_reduce_(0, index, self.norms, reduce="amax", include_self=True)
            return LayerNorms(groups, out)
        p = self.norm_type
        out = torch.zeros(len(groups), dtype=torch.float32, device=self.norms.device)
        out.index_add_(0, index, self.norms.float().pow(p))
        return LayerNorms(groups, out.pow(1.0 / p))

    def to_host(self) -> HostStats:
        """Copy everything to the host in a single device→host transfer."""
        parts = [self.total_norm.reshape(1).float(), self.norms.float()]
        for extra in (self.max_abs, self.zero_fraction):
            if extra is not None:
                parts.append(extra.float().to(self.norms.device))
        flat = torch.cat([p.to(self.norms.device) for p in parts]).cpu().tolist()
        n = len(self)
        max_abs = zero_fraction = None
        offset = 1 + n
        if self.max_abs is not None:
            max_abs, offset = flat[offset : offset + n], offset + n
        if self.zero_fraction is not None:
            zero_fraction = flat[offset : offset + n]
        return HostStats(flat[0], flat[1 : 1 + n], self.names, max_abs, zero_fraction)


@functools.lru_cache(maxsize=32)
def _index_tensor(positions: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(positions, dtype=torch.long, device=device)


def measure(
    parameters: ParamsLike,
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
    max_abs: bool = False,
    zero_fraction: bool = False,
) -> GradStats:
    """Measure the gradients of ``parameters`` in one pass, without a host sync.

    Args:
        parameters: a module, a tensor, an iterable of tensors, or ``named_parameters()``.
            Parameters whose ``.grad`` is ``None`` are left out.
        norm_type: p of the p-norm; ``inf`` for the max norm.
        foreach: as in :func:`torch.nn.utils.clip_grad_norm_`.
        dtype: accumulate norms in this dtype (e.g. ``torch.float32`` for fp16/bf16
            gradients, whose own-dtype norm overflows above 65504 in fp16). ``None``
            keeps torch's behaviour, so totals equal ``clip_grad_norm_`` bit for bit.
        max_abs: also compute the per-tensor max ``|g|`` (one extra read of the grads).
        zero_fraction: also compute the per-tensor fraction of exact zeros.

    Raises:
        ValueError: ``parameters`` holds no parameters at all.
        TypeError: a parameter is not a tensor, or a gradient is sparse.
    """
    p = check.norm_type(norm_type)
    found = grads_with_names(parameters)
    if found.given == 0:
        raise ValueError("parameters is empty: there is nothing to measure")
    return measure_grads(
        found.grads,
        p,
        names=found.names,
        foreach=foreach,
        dtype=dtype,
        max_abs=max_abs,
        zero_fraction=zero_fraction,
    )


def measure_weights(
    params: Sequence[Tensor], dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Tensor:
    """The global 2-norm of ``params`` (0-d, on ``device``; no host sync).

    Sharded parameters (DTensor) are measured across ranks, as gradients are.
    """
    total = measure_grads([p.detach() for p in params], 2.0, dtype=dtype).total_norm
    return total if device is None else total.to(device)


def measure_grads(
    grads: Sequence[Tensor],
    norm_type: float,
    *,
    names: Sequence[str] | None = None,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
    max_abs: bool = False,
    zero_fraction: bool = False,
) -> GradStats:
    """:func:`measure` on a list of gradient tensors (no validation of ``norm_type``).

    DTensor gradients (FSDP2, tensor parallel) are measured exactly across ranks by
    :func:`gradguard.distributed.sharded_norms` (a collective: every rank must call it).
    """
    shapes = tuple([g.shape for g in grads])
    name_tuple = tuple(names) if names is not None else None
    if not grads:
        empty = torch.zeros(0)
        return GradStats(empty, torch.tensor(0.0), norm_type, name_tuple, shapes)
    if has_dtensor(grads):
        sharded = sharded_norms(
            grads,
            norm_type,
            names=names,
            foreach=foreach,
            dtype=dtype,
            max_abs=max_abs,
            zero_fraction=zero_fraction,
        )
        return GradStats(
            sharded.norms,
            sharded.total,
            norm_type,
            name_tuple,
            shapes,
            sharded.max_abs,
            sharded.zero_fraction,
            sharded.local_nonfinite,
        )
    device = grads[0].device
    # Same stacking and reduction as torch.nn.utils.get_total_norm: bit-identical totals.
    norms, grouped = _foreach.stacked_norms(grads, norm_type, foreach, dtype, device)
    total = torch.linalg.vector_norm(grouped, norm_type)
    zeros = None
    if zero_fraction:
        sizes = torch.tensor([max(g.numel(), 1) for g in grads], device=device)
        zeros = (_foreach.zero_counts(grads, device) / sizes).float()
    return GradStats(
        norms=norms,
        total_norm=total,
        norm_type=norm_type,
        names=name_tuple,
        shapes=shapes,
        max_abs=_foreach.max_abs(grads, device) if max_abs else None,
        zero_fraction=zeros,
    )

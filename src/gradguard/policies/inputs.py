"""``StepInputs``: what every policy sees at one step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import ops as _ops
from ..ops import Array, Ops
from ..stats import GradStats

_F32_ZERO = np.float32(0.0)


class StepInputs:
    """What every policy sees at one step; arrays live in ``xp``'s library.

    Attributes:
        total_norm: 0-d float32 global norm of the gradients before any clipping
            (NaN or inf when a gradient held NaN/inf or the norm overflowed).
        norms: per-tensor norms, shape ``(n,)``, float32, in parameter order.
        xp: the :mod:`gradguard.ops` the arrays belong to.
        step: the step index (0-based): a host int, or a traced int32 under JAX.
        loss: this step's training loss (0-d float32, may be non-finite) when the caller
            gave one, else ``None``.
        lr: the learning rate of the first parameter group when known (a number, or a
            0-d array on the device), else ``None``.
        names: parameter names aligned with ``norms``, or ``None``.
        norm_type: the p of the p-norms.
        stats: the torch :class:`~gradguard.GradStats` of the step (``None`` elsewhere).
        params: the parameters, for in-place transforms (torch only).
        weight_norm: 0-d float32 global norm of the parameters, given only where the
            optimizer's step is the learning rate times the gradient (``torch.optim.SGD``)
            and the policy asks for it (:attr:`Policy.reads_weight_norm`), else ``None``.
        step_gain: with ``weight_norm``, how many steps of ``lr × g`` a persistent
            gradient moves the weights by: SGD's momentum gain
            ``(1 - dampening) / (1 - momentum)`` (1 without momentum); a host number.
        compile: whether a policy that can (:attr:`Policy.compilable`) runs its torch
            update as one compiled graph (``torch.compile``); set by the guard.
    """

    __slots__ = (
        "_norms",
        "compile",
        "count",
        "loss",
        "lr",
        "names",
        "norm_type",
        "params",
        "stats",
        "step",
        "step_gain",
        "total_norm",
        "weight_norm",
        "xp",
    )

    def __init__(
        self,
        total_norm: Array,
        norms: Array,
        xp: Ops,
        step: Any = 0,
        loss: Array | None = None,
        lr: Any = None,
        names: tuple[str, ...] | None = None,
        norm_type: float = 2.0,
        stats: GradStats | None = None,
        params: Sequence[Tensor] = (),
        weight_norm: Array | None = None,
        step_gain: float = 1.0,
        compile: bool = False,
    ) -> None:
        self.total_norm = total_norm
        self._norms = norms
        self.xp = xp
        self.step = step
        self.loss = loss
        self.lr = lr
        self.names = names
        self.norm_type = norm_type
        self.stats = stats
        self.params = params
        self.weight_norm = weight_norm
        self.step_gain = step_gain
        self.compile = compile
        #: How many tensors were measured.
        self.count = int(norms.shape[0])

    @property
    def norms(self) -> Array:
        norms = self._norms
        if self.xp is _ops.NUMPY and isinstance(norms, Tensor):
            # Host math reads a CPU tensor's memory as NumPy, when a policy first asks.
            norms = (norms if norms.dtype == torch.float32 else norms.float()).numpy()
            self._norms = norms
        return norms

    def __len__(self) -> int:
        return self.count

    def replace(self, **changes: Any) -> StepInputs:
        """A copy with some fields changed."""
        names = ("total_norm", "norms", "xp", "step", "loss", "lr", "names", "norm_type")
        extra = ("stats", "params", "weight_norm", "step_gain", "compile")
        fields = {name: getattr(self, name) for name in (*names, *extra)}
        fields.update(changes)
        return StepInputs(**fields)

    def __repr__(self) -> str:
        return (
            f"StepInputs(total_norm={self.total_norm!r}, step={self.step!r}, "
            f"loss={self.loss!r}, lr={self.lr!r}, tensors={self.count}, xp={self.xp.name})"
        )

    @classmethod
    def from_stats(
        cls,
        stats: GradStats,
        params: Sequence[Tensor] = (),
        *,
        xp: Ops | None = None,
        step: int = 0,
        loss: Tensor | float | None = None,
        lr: Any = None,
        weight_norm: Tensor | None = None,
        step_gain: float = 1.0,
        compile: bool = False,
    ) -> StepInputs:
        """The inputs of a step measured by :func:`gradguard.measure`.

        ``xp=None`` (or :data:`~gradguard.ops.TORCH`) keeps them as tensors on the
        gradients' device (no host sync); :data:`~gradguard.ops.NUMPY` reads them to the
        host, as the guard does for gradients on the CPU.
        """
        total = stats.total_norm
        if xp is None:
            xp = _ops.TORCH
        if xp is _ops.NUMPY:
            norms = stats.norms  # a CPU tensor, seen as NumPy when first read
            total_value = _F32_ZERO + total.item()  # one rounding to float32
            if isinstance(loss, Tensor):
                loss = loss.detach()
            loss_value = None if loss is None else _ops.NUMPY.f32(float(loss))
            if weight_norm is not None:
                weight_norm = _F32_ZERO + weight_norm.item()
        else:
            norms = stats.norms.float()
            total_value = total.float()
            loss_value = _device_loss(loss, total)
            if weight_norm is not None:
                weight_norm = weight_norm.float()
        return cls(
            total_value,
            norms,
            xp,
            step,
            loss_value,
            lr,
            stats.names,
            stats.norm_type,
            stats,
            params,
            weight_norm,
            step_gain,
            compile and xp is _ops.TORCH,
        )


def _device_loss(loss: Tensor | float | None, like: Tensor) -> Tensor | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        return loss.detach().reshape(()).float()
    return torch.full((), float(loss), dtype=torch.float32, device=like.device)

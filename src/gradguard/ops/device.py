"""Device math: decisions as torch tensors on the gradients' device, never a host sync."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Ops, measured_count, merge


class TorchOps(Ops):
    """Device math: every value a tensor on the gradients' device, no host sync."""

    name = "torch"

    def __init__(self) -> None:
        self._constants: dict[tuple[Any, torch.dtype, torch.device], torch.Tensor] = {}

    def _constant(self, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        value = (
            bool(value)
            if dtype == torch.bool
            else float(value)
            if dtype.is_floating_point
            else int(value)
        )
        if torch.compiler.is_compiling():  # a constant of the compiled graph: no cache
            return torch.full((), value, dtype=dtype, device=device)
        key = (value, dtype, device)
        constant = self._constants.get(key)
        if constant is None:  # shared and never written: one tensor per value and device
            constant = torch.full((), value, dtype=dtype, device=device)
            if len(self._constants) < 256:
                self._constants[key] = constant
        return constant

    def scalar(self, value, like):
        return self._constant(float(value), torch.float32, like.device)

    def flag(self, value, like):
        return self._constant(bool(value), torch.bool, like.device)

    def code(self, value, like):
        return self._constant(int(value), torch.int8, like.device)

    def full(self, size, value, like, dtype="float32"):
        return torch.full((size,), value, dtype=getattr(torch, dtype), device=like.device)

    def asarray(self, value, like=None):
        device = like.device if isinstance(like, torch.Tensor) else None
        if isinstance(value, torch.Tensor):
            return value.detach().to(device) if device is not None else value.detach()
        out = torch.as_tensor(np.asarray(value), device=device)
        return out.float() if out.dtype == torch.float16 else out

    def f32(self, x):
        return x.float()

    def f64(self, x):
        return x.double()

    def ravel(self, x):
        return x.reshape(-1)

    def where(self, condition, a, b):
        # A Python number would be made into a tensor at every call: use a cached one.
        if not isinstance(a, torch.Tensor):
            a = self._constant(a, b.dtype, b.device) if isinstance(b, torch.Tensor) else a
        elif not isinstance(b, torch.Tensor):
            b = self._constant(b, a.dtype, a.device)
        return torch.where(condition, a, b)

    def isfinite(self, x):
        return x * 0 == 0  # NaN and inf give NaN: two kernels, where torch.isfinite takes four

    isnan = staticmethod(torch.isnan)
    sqrt = staticmethod(torch.sqrt)
    log10 = staticmethod(torch.log10)
    floor = staticmethod(torch.floor)
    reciprocal = staticmethod(torch.reciprocal)
    sum = staticmethod(torch.sum)

    def minimum(self, a, b):
        return torch.clamp(a, max=b) if isinstance(b, (int, float)) else torch.minimum(a, b)

    def maximum(self, a, b):
        return torch.clamp(a, min=b) if isinstance(b, (int, float)) else torch.maximum(a, b)

    def clip(self, x, low=None, high=None):
        return torch.clamp(x, min=low, max=high)

    def as_index(self, x):
        return x.long()

    def vector_norm(self, x, p):
        return torch.linalg.vector_norm(x, p)

    def cumsum(self, x):
        return x.cumsum(0)

    def nanquantile(self, x, q):
        return torch.nanquantile(x, q)

    def searchsorted(self, sorted_values, value):
        return torch.searchsorted(sorted_values, value.reshape(1)).reshape(())

    def take(self, x, index):
        return x[index]

    def set_at(self, x, index, value):
        x[index] = value
        return x

    def add_at(self, x, index, values):
        return x.index_add_(0, index.reshape(-1), values.reshape(-1).to(x.dtype))

    def cond(self, predicate, if_true, if_false, *args):
        if not isinstance(predicate, torch.Tensor):
            return if_true(*args) if predicate else if_false(*args)
        # No branching on a device value: both branches run, the predicate selects.
        return merge(self, predicate, if_true(*args), if_false(*args), measured_count(args))

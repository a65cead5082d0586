"""Host math: the decisions of a guard whose gradients live on the CPU, in NumPy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Ops

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TRUE, _FALSE = np.bool_(True), np.bool_(False)
_CODES = {code: np.int8(code) for code in range(8)}
_SCALARS = frozenset({float, int, bool, np.float32, np.float64, np.bool_, np.int8, np.int64})


def _typed(value: Any) -> Any:
    """A chosen host scalar: Python numbers become float32, NumPy scalars keep their type."""
    kind = type(value)
    return _ZERO + value if kind is float or kind is int else value


def _f32(value: Any) -> Any:
    """A host scalar as a NumPy float32 (adding to a float32 zero rounds a Python float once;
    it is much cheaper than the ``np.float32`` constructor)."""
    kind = type(value)
    if kind is np.float32:
        return value
    if kind is float or kind is int:
        return _ZERO + value
    return np.float32(value)


class NumpyOps(Ops):
    """Host math: 0-d values are NumPy float32 scalars.

    A NumPy ufunc called on a scalar costs microseconds, about as much as the torch
    operation it replaces; scalar operators cost a tenth of that. So 0-d values take
    Python-level paths below (same IEEE float32 results), arrays the ufuncs.
    """

    name = "numpy"

    def scalar(self, value, like):
        return _f32(value)

    def full(self, size, value, like, dtype="float32"):
        return np.full(size, value, dtype=dtype)

    def flag(self, value, like):
        return _TRUE if value else _FALSE

    def code(self, value, like):
        return _CODES[value] if value in _CODES else np.int8(value)

    def asarray(self, value, like=None):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out = np.asarray(value)
        if out.dtype.kind == "f" and out.dtype != np.float32 and out.dtype != np.float64:
            out = out.astype(np.float32)
        return out[()] if out.ndim == 0 else out.copy()

    def f32(self, x):
        if type(x) in _SCALARS:
            return _f32(x)
        return np.asarray(x, dtype=np.float32)

    def f64(self, x):
        return np.float64(x) if type(x) in _SCALARS else np.asarray(x, dtype=np.float64)

    def ravel(self, x):
        return np.ravel(x)

    def where(self, condition, a, b):
        if type(condition) in _SCALARS and type(a) in _SCALARS and type(b) in _SCALARS:
            out = a if condition else b
            kind = type(out)
            return _ZERO + out if kind is float or kind is int else out
        return np.where(condition, a, b)

    def isfinite(self, x):
        if type(x) in _SCALARS:
            return _TRUE if math.isfinite(x) else _FALSE
        return np.isfinite(x)

    def isnan(self, x):
        if type(x) in _SCALARS:
            return _TRUE if x != x else _FALSE
        return np.isnan(x)

    def sqrt(self, x):
        if type(x) in _SCALARS:  # float32 sqrt = the float64 one rounded once: exact
            return _ZERO + (math.sqrt(x) if x >= 0 else math.nan) if x == x else _f32(x)
        return np.sqrt(x)

    def reciprocal(self, x):
        if type(x) in _SCALARS:
            return _ONE / x
        return np.reciprocal(x)

    def minimum(self, a, b):
        if type(a) in _SCALARS and type(b) in _SCALARS:  # NaN wins, as in np.minimum
            out = a if (a != a or a <= b) else b
            kind = type(out)  # (_typed, inlined: this runs ~15 times a step)
            return _ZERO + out if kind is float or kind is int else out
        return np.minimum(a, b)

    def maximum(self, a, b):
        if type(a) in _SCALARS and type(b) in _SCALARS:
            out = a if (a != a or a >= b) else b
            kind = type(out)
            return _ZERO + out if kind is float or kind is int else out
        return np.maximum(a, b)

    def logical_not(self, x):
        if type(x) in _SCALARS:  # NumPy's ~ on a bool scalar costs ~0.7 µs
            return _FALSE if x else _TRUE
        return np.logical_not(x)

    log10 = staticmethod(np.log10)
    floor = staticmethod(np.floor)
    sum = staticmethod(np.sum)
    cumsum = staticmethod(np.cumsum)
    take = staticmethod(np.take)

    def as_index(self, x):
        return np.asarray(x).astype(np.int64)

    def vector_norm(self, x, p):
        x = np.abs(np.asarray(x, dtype=np.float32))
        if math.isinf(p):
            return np.float32(x.max(initial=0.0) if p > 0 else x.min(initial=math.inf))
        if p == 2.0:
            return np.float32(np.sqrt(np.sum(x * x)))
        return np.float32(np.sum(x**p) ** (1.0 / p))

    def nanquantile(self, x, q):
        # torch's formula (float32 rank and weight, its lerp), not NumPy's float64 one.
        values = np.sort(np.asarray(x, dtype=np.float32))  # NaN last, as in torch
        count = int(np.count_nonzero(values == values))
        if count == 0:
            return np.float32(math.nan)
        rank = _f32(q) * _f32(count - 1)
        below, above = int(rank), math.ceil(rank)
        weight = rank - _f32(below)
        low, high = values[below], values[above]
        if weight < 0.5:
            return low + weight * (high - low)
        return high - (high - low) * (_ONE - weight)

    def searchsorted(self, sorted_values, value):
        return np.searchsorted(sorted_values, value, side="left")

    def set_at(self, x, index, value):
        x[index] = value
        return x

    def add_at(self, x, index, values):
        np.add.at(x, index, values)
        return x

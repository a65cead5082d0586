"""The array operations a policy's update is written with: one update, three back-ends.

A policy's update is a pure function of its state and the step's inputs, written against
an :class:`Ops` object ``xp`` instead of a library, so the same lines run

* on host numbers (:data:`NUMPY`) when the gradients live on the CPU: nothing waits on a
  device there, and a 0-d NumPy operation costs a fraction of a 0-d torch operation
  (whose dispatch alone is a few microseconds), which is most of a small model's
  clipping cost;
* on device tensors (:data:`TORCH`) on an accelerator: every value stays on the device,
  no operation syncs with the host;
* inside a jitted JAX step (:func:`jax_ops`, used by :mod:`gradguard.frontends.jax`).

Everything is float32, and the operations are chosen so NumPy and torch round alike
(``tests/test_ops.py`` checks that both give the same bits). Rules for policy code:

* combine arrays with Python operators (``+ - * / **``, ``& | ~``, comparisons) and the
  methods here; divide a *number* by an array with :meth:`Ops.div` (torch multiplies by
  the reciprocal there, and NumPy must round the same way);
* keep per-step counters as plain ints made by :meth:`Ops.counter` (host ints for NumPy
  and torch, traced int32 under JAX); branch on them with :meth:`Ops.cond`;
* treat a state passed to an update as consumed: :meth:`Ops.set_at` and
  :meth:`Ops.add_at` may write into it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Array = Any  #: a NumPy array or scalar, a torch tensor, or a JAX array


class Ops:
    """The operations of one array library (see the module docstring)."""

    name = "abstract"
    #: True where values are traced (JAX under jit): no Python branching on them, and
    #: every state field must keep one structure across steps.
    traced = False

    # -- creation ------------------------------------------------------------------------
    def scalar(self, value: float, like: Array) -> Array:
        """A float32 0-d constant where ``like`` lives."""
        raise NotImplementedError

    def full(self, size: int, value: float, like: Array, dtype: str = "float32") -> Array:
        """A 1-D array of ``size`` copies of ``value`` where ``like`` lives."""
        raise NotImplementedError

    def counter(self, value: int = 0) -> Any:
        """A step counter: a host int, or a traced int32 where values are traced."""
        return int(value)

    def flag(self, value: bool, like: Array) -> Array:
        """A 0-d boolean constant where ``like`` lives."""
        raise NotImplementedError

    def code(self, value: int, like: Array) -> Array:
        """A 0-d int8 constant (a skip reason) where ``like`` lives."""
        raise NotImplementedError

    def asarray(self, value: Any, like: Array | None = None) -> Array:
        """``value`` (a number, or an array of any of the three libraries) in this library."""
        raise NotImplementedError

    def f32(self, x: Array) -> Array:
        """``x`` as float32."""
        raise NotImplementedError

    def f64(self, x: Array) -> Array:
        """``x`` as float64 (float32 under JAX unless 64-bit mode is on)."""
        raise NotImplementedError

    def ravel(self, x: Array) -> Array:
        """``x`` as a 1-D array."""
        raise NotImplementedError

    # -- element-wise --------------------------------------------------------------------
    def where(self, condition: Array, a: Array | float, b: Array | float) -> Array:
        raise NotImplementedError

    def isfinite(self, x: Array) -> Array:
        raise NotImplementedError

    def isnan(self, x: Array) -> Array:
        raise NotImplementedError

    def sqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def log10(self, x: Array) -> Array:
        raise NotImplementedError

    def floor(self, x: Array) -> Array:
        raise NotImplementedError

    def minimum(self, a: Array, b: Array | float) -> Array:
        raise NotImplementedError

    def maximum(self, a: Array, b: Array | float) -> Array:
        raise NotImplementedError

    def clip(self, x: Array, low: float | None = None, high: float | None = None) -> Array:
        raise NotImplementedError

    def div(self, a: Array | float, b: Array) -> Array:
        """``a / b``; a number divided by an array is ``reciprocal(b) * a``, as torch does."""
        if isinstance(a, (int, float)):
            return self.reciprocal(b) * a
        return a / b

    def reciprocal(self, x: Array) -> Array:
        raise NotImplementedError

    def as_index(self, x: Array) -> Array:
        """A float array of whole numbers as integer indices."""
        raise NotImplementedError

    # -- reductions and indexing ----------------------------------------------------------
    def sum(self, x: Array) -> Array:
        raise NotImplementedError

    def vector_norm(self, x: Array, p: float) -> Array:
        """The p-norm of a 1-D array (float32)."""
        raise NotImplementedError

    def cumsum(self, x: Array) -> Array:
        raise NotImplementedError

    def nanquantile(self, x: Array, q: float) -> Array:
        """The ``q``-quantile of the non-NaN values (linear interpolation); NaN if none."""
        raise NotImplementedError

    def searchsorted(self, sorted_values: Array, value: Array) -> Array:
        """The first index ``i`` with ``value <= sorted_values[i]`` (0-d)."""
        raise NotImplementedError

    def take(self, x: Array, index: Array) -> Array:
        raise NotImplementedError

    def set_at(self, x: Array, index: Any, value: Array) -> Array:
        """``x`` with ``x[index] = value`` (may write into ``x``)."""
        raise NotImplementedError

    def add_at(self, x: Array, index: Array, values: Array) -> Array:
        """``x`` with ``values`` added at ``index`` (repeats accumulate; may write into ``x``)."""
        raise NotImplementedError

    def head(self, x: Array, n: Any) -> Array:
        """The first ``n`` entries, or all of a NaN-padded ``x`` where ``n`` is traced."""
        return x[:n]

    # -- control -------------------------------------------------------------------------
    def cond(self, predicate: Any, if_true: Callable, if_false: Callable, *args: Any) -> Any:
        """``if_true(*args)`` where ``predicate`` holds, else ``if_false(*args)``.

        A host bool picks one branch; under JAX a traced one runs ``lax.cond``, whose
        branches must return the same structure.
        """
        return if_true(*args) if predicate else if_false(*args)

    def __repr__(self) -> str:
        return f"<gradguard ops: {self.name}>"


class _NumpyOps(Ops):
    """Host math: 0-d values are NumPy float32 scalars."""

    name = "numpy"

    def scalar(self, value, like):
        return np.float32(value)

    def full(self, size, value, like, dtype="float32"):
        return np.full(size, value, dtype=dtype)

    def flag(self, value, like):
        return np.bool_(value)

    def code(self, value, like):
        return np.int8(value)

    def asarray(self, value, like=None):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out = np.asarray(value)
        if out.dtype.kind == "f" and out.dtype != np.float32 and out.dtype != np.float64:
            out = out.astype(np.float32)
        return out[()] if out.ndim == 0 else out.copy()

    def f32(self, x):
        return np.float32(x) if np.ndim(x) == 0 else np.asarray(x, dtype=np.float32)

    def f64(self, x):
        return np.float64(x) if np.ndim(x) == 0 else np.asarray(x, dtype=np.float64)

    def ravel(self, x):
        return np.ravel(x)

    def where(self, condition, a, b):
        if np.ndim(condition) == 0 and np.ndim(a) == 0 and np.ndim(b) == 0:
            chosen = a if condition else b
            return chosen if isinstance(chosen, np.generic) else np.float32(chosen)
        return np.where(condition, a, b)

    isfinite = staticmethod(np.isfinite)
    isnan = staticmethod(np.isnan)
    sqrt = staticmethod(np.sqrt)
    log10 = staticmethod(np.log10)
    floor = staticmethod(np.floor)
    reciprocal = staticmethod(np.reciprocal)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    sum = staticmethod(np.sum)
    cumsum = staticmethod(np.cumsum)
    take = staticmethod(np.take)

    def clip(self, x, low=None, high=None):
        if low is not None:
            x = np.maximum(x, low)
        if high is not None:
            x = np.minimum(x, high)
        return x

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
        if not np.any(~np.isnan(x)):
            return np.float32(math.nan)
        return np.float32(np.nanquantile(x, q))

    def searchsorted(self, sorted_values, value):
        return np.searchsorted(sorted_values, value, side="left")

    def set_at(self, x, index, value):
        x[index] = value
        return x

    def add_at(self, x, index, values):
        np.add.at(x, index, values)
        return x


class _TorchOps(Ops):
    """Device math: every value a tensor on the gradients' device, no host sync."""

    name = "torch"

    def __init__(self) -> None:
        self._constants: dict[tuple[Any, torch.dtype, torch.device], torch.Tensor] = {}

    def _constant(self, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
        return torch.where(condition, a, b)

    isfinite = staticmethod(torch.isfinite)
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


NUMPY: Ops = _NumpyOps()
TORCH: Ops = _TorchOps()


def for_device(device: torch.device) -> Ops:
    """The ops a policy decides with for gradients on ``device``: host math on the CPU."""
    return NUMPY if device.type == "cpu" else TORCH


def namespace_of(value: Any) -> Ops | None:
    """The ops whose arrays ``value`` is (``None`` for plain Python values)."""
    if isinstance(value, torch.Tensor):
        return TORCH
    if isinstance(value, (np.ndarray, np.generic)):
        return NUMPY
    if type(value).__module__.startswith("jax"):
        return jax_ops()
    return None


@functools.cache
def jax_ops() -> Ops:
    """The JAX ops (imports JAX on first use)."""
    from ._jax_ops import JaxOps

    return JaxOps()


def clip_coefficient(xp: Ops, limit: Array | float, norm: Array) -> Array:
    """``min(limit / (norm + 1e-6), 1)``: torch's clip coefficient, in any back-end."""
    return xp.minimum(xp.div(limit, norm + 1e-6), 1.0)

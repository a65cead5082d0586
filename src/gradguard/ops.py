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

        A host bool runs one branch. A device predicate (torch) runs both and selects
        with ``where``; under JAX a traced one runs ``lax.cond``. Both branches must then
        return the same structure (decisions may leave different fields unset).
        """
        return if_true(*args) if predicate else if_false(*args)

    def __repr__(self) -> str:
        return f"<gradguard ops: {self.name}>"


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


class _NumpyOps(Ops):
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
            return _typed(a if condition else b)
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
            return _typed(a if (a != a or a <= b) else b)
        return np.minimum(a, b)

    def maximum(self, a, b):
        if type(a) in _SCALARS and type(b) in _SCALARS:
            return _typed(a if (a != a or a >= b) else b)
        return np.maximum(a, b)

    log10 = staticmethod(np.log10)
    floor = staticmethod(np.floor)
    sum = staticmethod(np.sum)
    cumsum = staticmethod(np.cumsum)
    take = staticmethod(np.take)

    def clip(self, x, low=None, high=None):
        if low is not None:
            x = self.maximum(x, low)
        if high is not None:
            x = self.minimum(x, high)
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

    def cond(self, predicate, if_true, if_false, *args):
        if not isinstance(predicate, torch.Tensor):
            return if_true(*args) if predicate else if_false(*args)
        # No branching on a device value: both branches run, the predicate selects.
        return merge(self, predicate, if_true(*args), if_false(*args), _count(args))


def _count(args: tuple[Any, ...]) -> int | None:
    """The number of measured tensors, from the first argument that knows it."""
    return next((a.count for a in args if hasattr(a, "count") and hasattr(a, "norms")), None)


def merge(xp: Ops, predicate: Array, a: Any, b: Any, count: int | None) -> Any:
    """``a`` where ``predicate`` holds, else ``b``, leaf by leaf, for two results of the
    same structure (tuples, named tuples, decisions, arrays; host ints must agree)."""
    if a is None and b is None:
        return None
    if hasattr(a, "filled") and hasattr(b, "filled"):  # decisions: unset fields are neutral
        if any((x is None) != (y is None) for x, y in zip(a.arrays(), b.arrays())):
            a, b = a.filled(xp, count), b.filled(xp, count)
        fields = [merge(xp, predicate, x, y, count) for x, y in zip(a.arrays(), b.arrays())]
        return type(a).from_arrays((*a.transforms, *b.transforms), fields)
    if isinstance(a, tuple):
        merged = [merge(xp, predicate, x, y, count) for x, y in zip(a, b)]
        return type(a)(*merged) if hasattr(a, "_fields") else tuple(merged)
    if isinstance(a, int) and isinstance(b, int):
        if a != b:
            raise ValueError("cond: the branches returned different host counters")
        return a
    return xp.where(predicate, a, b)


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

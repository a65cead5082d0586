"""The :class:`Ops` interface, and what every back-end shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

    def logical_not(self, x: Array) -> Array:
        return ~x  # a bool array's ~ (torch, JAX); NumPy's host scalars take a faster path

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
        if low is not None:
            x = self.maximum(x, low)
        if high is not None:
            x = self.minimum(x, high)
        return x

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


def measured_count(args: tuple[Any, ...]) -> int | None:
    """The number of measured tensors, from the first argument that knows it."""
    return next((a.count for a in args if hasattr(a, "count") and hasattr(a, "norms")), None)


def merge(xp: Ops, predicate: Array, a: Any, b: Any, count: int | None) -> Any:
    """``a`` where ``predicate`` holds, else ``b``, leaf by leaf, for two results of the
    same structure (tuples, named tuples, decisions, arrays; host ints must agree)."""
    if isinstance(a, tuple):  # before the identity test, which torch.compile cannot trace
        merged = [merge(xp, predicate, x, y, count) for x, y in zip(a, b)]
        return type(a)(*merged) if hasattr(a, "_fields") else tuple(merged)
    if a is b:  # unchanged by both branches (None included)
        return a
    if hasattr(a, "filled") and hasattr(b, "filled"):  # decisions: unset fields are neutral
        if any((x is None) != (y is None) for x, y in zip(a.arrays(), b.arrays())):
            a, b = a.filled(xp, count), b.filled(xp, count)
        fields = [merge(xp, predicate, x, y, count) for x, y in zip(a.arrays(), b.arrays())]
        return type(a).from_arrays((*a.transforms, *b.transforms), fields)
    if isinstance(a, int) and isinstance(b, int):
        if a != b:
            raise ValueError("cond: the branches returned different host counters")
        return a
    return xp.where(predicate, a, b)


def clip_coefficient(xp: Ops, limit: Array | float, norm: Array) -> Array:
    """``min(limit / (norm + 1e-6), 1)``: torch's clip coefficient, in any back-end."""
    return xp.minimum(xp.div(limit, norm + 1e-6), 1.0)

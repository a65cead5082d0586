"""The JAX back-end of :mod:`gradguard.ops` (imported only when JAX is used)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .base import Ops, measured_count


def _float64() -> Any:  # float64 where JAX's 64-bit mode allows it
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.Array) and not isinstance(value, (bool, np.bool_))


class JaxOps(Ops):
    """Traced math inside ``jit``: counters are int32 arrays, updates are functional."""

    name = "jax"
    traced = True

    def scalar(self, value, like):
        return jnp.asarray(value, jnp.float32)

    def full(self, size, value, like, dtype="float32"):
        return jnp.full((size,), value, dtype=_float64() if dtype == "float64" else dtype)

    def flag(self, value, like):
        return jnp.asarray(bool(value))

    def code(self, value, like):
        return jnp.asarray(value, jnp.int8)

    def counter(self, value=0):
        return jnp.asarray(value, jnp.int32)

    def asarray(self, value, like=None):
        if hasattr(value, "detach"):  # a torch tensor (a checkpoint)
            value = value.detach().cpu().numpy()
        return jnp.asarray(value)

    def f32(self, x):
        return jnp.asarray(x, jnp.float32)

    def f64(self, x):
        return jnp.asarray(x, _float64())

    def ravel(self, x):
        return jnp.ravel(x)

    def where(self, condition, a, b):
        return jnp.where(condition, a, b)

    isfinite = staticmethod(jnp.isfinite)
    isnan = staticmethod(jnp.isnan)
    sqrt = staticmethod(jnp.sqrt)
    log10 = staticmethod(jnp.log10)
    floor = staticmethod(jnp.floor)
    reciprocal = staticmethod(jnp.reciprocal)
    minimum = staticmethod(jnp.minimum)
    maximum = staticmethod(jnp.maximum)
    sum = staticmethod(jnp.sum)
    cumsum = staticmethod(jnp.cumsum)
    take = staticmethod(jnp.take)

    def vector_norm(self, x, p):
        return jnp.linalg.norm(x, ord=p).astype(jnp.float32)

    def as_index(self, x):
        return jnp.asarray(x).astype(jnp.int32)

    def nanquantile(self, x, q):
        value = jnp.nanquantile(x, q)
        return jnp.where(jnp.all(jnp.isnan(x)), math.nan, value).astype(jnp.float32)

    def searchsorted(self, sorted_values, value):
        return jnp.searchsorted(sorted_values, value, side="left")

    def set_at(self, x, index, value):
        return x.at[index].set(value)

    def add_at(self, x, index, values):
        return x.at[index].add(values)

    def head(self, x, n):
        return x if _is_traced(n) else x[:n]

    def cond(self, predicate, if_true, if_false, *args):
        if not _is_traced(predicate):
            return if_true(*args) if predicate else if_false(*args)
        count = measured_count(args)
        # Decisions may leave different fields unset in the two branches: fill just those.
        shapes = [_as_tuple(jax.eval_shape(lambda f=f: f(*args))) for f in (if_true, if_false)]
        gaps = [_unset_in_one(a, b) if hasattr(a, "filled") else None for a, b in zip(*shapes)]

        def run(fn):
            out = _as_tuple(fn(*args))
            return tuple(
                o if gap is None else _fill(self, o, gap, count) for o, gap in zip(out, gaps)
            )

        # Branches close over the operands: only their outputs need to be pytrees.
        out = jax.lax.cond(predicate, lambda: run(if_true), lambda: run(if_false))
        return out if len(out) != 1 else out[0]


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) and not hasattr(out, "_fields") else (out,)


def _unset_in_one(a: Any, b: Any) -> tuple[bool, ...]:
    return tuple((x is None) != (y is None) for x, y in zip(a.arrays(), b.arrays()))


def _fill(xp: Ops, decision: Any, gaps: tuple[bool, ...], count: int | None) -> Any:
    filled = decision.filled(xp, count)
    arrays = [f if gap else d for d, f, gap in zip(decision.arrays(), filled.arrays(), gaps)]
    return type(decision).from_arrays(tuple(decision.transforms), arrays)


#: The JAX operations (decisions must be registered as pytrees by the caller:
#: :mod:`gradguard.frontends.jax` does).
JAX = JaxOps()

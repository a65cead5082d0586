"""The Keras recorder's on-device log: a ring buffer of step rows written inside the
compiled train step, read on the host once per interval.

A row is ``[step_hi, step_lo, total norm, clipped norm, learning rate, skipped, loss
scale, per-variable norms...]``; the step is split in two float32 columns so that it
stays exact far beyond float32's 2**24.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

STEP_HI, STEP_LO, TOTAL, CLIPPED, LR, SKIPPED, SCALE = range(7)
HEAD = 7
_STEP_BASE = 65536


def squares(grads: Sequence[Any]) -> Any:
    """Per-tensor sums of squares, in float32, as one vector."""
    return ops.stack([ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads])


def index_of(variables: Sequence[Any], target: Any) -> int:
    """Position of ``target`` in ``variables`` (by identity: Keras variables compare
    element-wise)."""
    for i, v in enumerate(variables):
        if v is target:
            return i
    raise LookupError(f"{target.path} is not among the optimizer's variables")


class StepLog:
    """A ring buffer of step rows and a step counter, as Keras variables.

    :meth:`write` assigns through the variables, so it works eagerly (PyTorch), in a
    ``tf.function`` (TensorFlow) and inside Keras's stateless scopes (JAX). On JAX the
    variables must be ``optimizer``'s own (``threaded``): Keras threads only the
    optimizer's variables through the optimizer's stateless update. They are then kept
    out of the optimizer's saved state (:meth:`while_hidden`) and removed at the end.
    """

    def __init__(self, optimizer: Any, width: int, capacity: int, *, threaded: bool) -> None:
        self.optimizer = optimizer if threaded else None
        self.capacity = capacity
        shape, names = (capacity, HEAD + width), ("gradguard_rows", "gradguard_steps")
        if threaded:
            self.rows = optimizer.add_variable(shape, "zeros", "float32", name=names[0])
            self.count = optimizer.add_variable((), "zeros", "int32", name=names[1])
        else:
            self.rows = keras.Variable(ops.zeros(shape), trainable=False, name=names[0])
            self.count = keras.Variable(0, dtype="int32", trainable=False, name=names[1])
        self.variables = (self.rows, self.count)

    def write(self, total: Any, clipped: Any, lr: Any, skipped: float, scale: Any, norms: Any):
        """Append one step's row (device ops only)."""
        count = ops.convert_to_tensor(self.count.value)
        step = ops.add(count, 1)
        hi = ops.floor_divide(step, _STEP_BASE)
        lo = ops.subtract(step, ops.multiply(hi, _STEP_BASE))
        head = [hi, lo, total, clipped, lr, skipped, scale]
        head = ops.stack([ops.reshape(ops.cast(v, "float32"), ()) for v in head])
        row = ops.concatenate([head, ops.cast(norms, "float32")])[None, :]
        at = ops.mod(count, self.capacity)
        self.rows.assign(ops.slice_update(self.rows.value, (at, 0), row))
        self.count.assign(step)

    def read(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, rows)`` on the host: one transfer. During a JAX ``fit`` the live
        values are in the trainer's state, not in the variables."""
        state = getattr(model, "_jax_state", None)
        if state and not getattr(model, "_jax_state_synced", True):
            values = state["optimizer_variables"]
            rows = np.asarray(values[index_of(model.optimizer.variables, self.rows)])
        else:
            rows = np.asarray(ops.convert_to_numpy(self.rows.value))
        steps = rows[:, STEP_HI].astype(np.int64) * _STEP_BASE + rows[:, STEP_LO].astype(np.int64)
        return steps, rows

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """Take the log's variables out of the optimizer's list for a while."""
        if self.optimizer is None:
            yield
            return
        owned = self.optimizer._variables
        everything = list(owned)
        self.remove()
        try:
            yield
        finally:
            owned[:] = everything

    def while_hidden(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` (an optimizer's save or load of its variables) without the log's."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.hidden():
                return method(*args, **kwargs)

        return wrapped

    def remove(self) -> None:
        """Take the log's variables out of the optimizer's list."""
        if self.optimizer is not None:
            owned = self.optimizer._variables
            owned[:] = [v for v in owned if not any(v is mine for mine in self.variables)]

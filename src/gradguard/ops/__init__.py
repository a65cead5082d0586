"""The array operations a policy's update is written with: one update, three back-ends.

A policy's update is a pure function of its state and the step's inputs, written against
an :class:`Ops` object ``xp`` instead of a library, so the same lines run

* on host numbers (:data:`NUMPY`) when the gradients live on the CPU: nothing waits on a
  device there, and a 0-d NumPy operation costs a fraction of a 0-d torch operation
  (whose dispatch alone is a few microseconds), which is most of a small model's
  clipping cost;
* on device tensors (:data:`TORCH`) on an accelerator: every value stays on the device,
  no operation syncs with the host;
* inside a jitted JAX step (:data:`gradguard.ops.jax.JAX`, used by
  :mod:`gradguard.frontends.jax`).

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

from typing import Any

import numpy as np
import torch

from .base import Array, Ops, clip_coefficient, measured_count, merge
from .device import TorchOps
from .host import NumpyOps

NUMPY: Ops = NumpyOps()
TORCH: Ops = TorchOps()


def namespace_of(value: Any) -> Ops | None:
    """The ops whose arrays ``value`` is (``None`` for plain Python values)."""
    if isinstance(value, torch.Tensor):
        return TORCH
    if isinstance(value, (np.ndarray, np.generic)):
        return NUMPY
    return None


__all__ = [
    "NUMPY",
    "TORCH",
    "Array",
    "Ops",
    "clip_coefficient",
    "measured_count",
    "merge",
    "namespace_of",
]

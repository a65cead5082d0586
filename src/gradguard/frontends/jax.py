"""JAX/optax front-end: gradguard policies as optax transformations, and recording.

Every gradguard policy runs in JAX with the very update the torch ``Guard`` runs
(written once over :mod:`gradguard.ops`):

* :func:`guard` wraps a whole optax optimizer: the policy's clips scale the gradients it
  sees, and a skipped step zeroes the updates and keeps its state, like
  :class:`gradguard.Guard` (``guard(optax.adam(1e-3))`` uses the default policy);
* :func:`transform` makes any clipping policy an optax transformation; :func:`zclip`,
  :func:`autoclip`, :func:`clip_tensor_norm` and :func:`skip_nonfinite` are shorthands
  with the torch policies' arguments and defaults;
* :func:`clip_norm`, :func:`clip_value` and :func:`agc` give optax's own updates bit for
  bit (``clip_by_global_norm``, ``clip``, ``adaptive_grad_clip``), with stats;
* :class:`JaxRecorder` records a jitted run to a gradguard run store, copying its stats
  to the host once per log interval.

Everything is pure and ``jit``-compatible; every state carries a :class:`ClipStats`.
"""

from ._jax_recorder import JaxRecorder
from ._jax_transforms import (
    ClipStats,
    GuardState,
    PolicyState,
    SkipState,
    StatsState,
    agc,
    autoclip,
    clip_norm,
    clip_tensor_norm,
    clip_value,
    find_stats,
    guard,
    leaf_names,
    measure,
    skip_nonfinite,
    transform,
    with_stats,
    zclip,
)

__all__ = [
    "ClipStats",
    "GuardState",
    "JaxRecorder",
    "PolicyState",
    "SkipState",
    "StatsState",
    "agc",
    "autoclip",
    "clip_norm",
    "clip_tensor_norm",
    "clip_value",
    "find_stats",
    "guard",
    "leaf_names",
    "measure",
    "skip_nonfinite",
    "transform",
    "with_stats",
    "zclip",
]

"""Recording a JAX training run without blocking its steps.

The stats travel out of the jitted step inside the optax state the step already returns.
:class:`JaxRecorder` takes that state each step, packs its stats into one small device
array (an asynchronous dispatch, so the step is not waited for) and pulls an interval's
worth to the host in one ``jax.device_get`` every ``log_every`` steps. We do not use
``jax.debug.callback``: it would run a host callback inside every compiled step (a
device→host copy and a runtime round trip per step on an accelerator, repeated per
device under ``pmap``/sharding, and serialising with ``ordered=True``), while the state
route costs one transfer per interval and keeps the compiled step free of side effects.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..record import RunStore
from ..schema import HostBatch, Sink, SkipReason, skip_event
from ._host import HostRecorder
from ._jax_transforms import ClipStats, find_stats, leaf_names

_F32 = jnp.float32
_HEAD = 8  # the packed per-step values before the per-leaf norms


@jax.jit
def _pack(stats: ClipStats, skipped, reason, skip_total, loss, lr) -> jax.Array:
    """One f32 vector per step (a fresh buffer, so donating the state is safe)."""
    head = jnp.stack(
        [
            jnp.where(skipped, skip_total, stats.total_norm),
            jnp.where(skipped, jnp.nan, stats.clipped_norm),
            jnp.where(skipped, jnp.nan, stats.clip_coef),
            stats.threshold,
            skipped.astype(_F32),
            reason.astype(_F32),
            jnp.asarray(loss, _F32),
            jnp.asarray(lr, _F32),
        ]
    )
    return jnp.concatenate([head, stats.norms.astype(_F32)])


class JaxRecorder:
    """Record a JAX training run to a gradguard run store without blocking its steps.

    Call :meth:`record` after each step with the optax state the step returned; the
    state's :class:`ClipStats` (and :class:`GuardState`, if any) are packed on the device
    and copied to the host once every ``log_every`` steps. A skipped step is recorded
    with the same skip event as a PyTorch run's (reason, non-finite leaf names).

    Args:
        names: leaf names of the gradient tree (e.g. ``leaf_names(params)``).
        shapes: leaf shapes, for the store's meta.
        store, sinks, log_every, tensor_every, health, config: as for
            :class:`~gradguard.frontends.HostRecorder`.
    """

    def __init__(
        self,
        store: RunStore | str | os.PathLike[str] | bool | None = None,
        *,
        names: Sequence[str] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        tensor_every: int | None = None,
        health: Any = True,
        config: dict | None = None,
    ) -> None:
        self.host = HostRecorder(
            store,
            sinks=sinks,
            log_every=log_every,
            tensor_every=tensor_every,
            health=health,
            config={"framework": "jax", **(config or {})},
        )
        self._names = None if names is None else tuple(names)
        self._shapes = shapes
        self._rows: list[tuple[int, jax.Array]] = []
        self.transfers = 0  #: device→host transfers made so far

    @classmethod
    def for_params(cls, params: Any, store: Any = None, **kwargs: Any) -> JaxRecorder:
        """A recorder whose names and shapes come from a parameter tree."""
        shapes = [tuple(np.shape(leaf)) for leaf in jax.tree.leaves(params)]
        return cls(store, names=leaf_names(params), shapes=shapes, **kwargs)

    @property
    def log_every(self) -> int:
        return self.host.log_every

    def record(
        self, step: int, opt_state: Any, *, loss: Any = None, lr: Any = None
    ) -> HostBatch | None:
        """Buffer ``step``'s stats from ``opt_state`` (no host sync except every
        ``log_every`` calls); returns the flushed batch on those calls."""
        stats, guard = find_stats(opt_state)
        if stats is None:
            raise ValueError(
                "opt_state holds no gradguard ClipStats: build the optimizer with a "
                "gradguard.frontends.jax transformation (guard, clip_norm, zclip, ...)"
            )
        skipped = guard.skipped if guard is not None else jnp.zeros((), bool)
        reason = guard.reason if guard is not None else jnp.zeros((), jnp.int8)
        skip_total = guard.total_norm if guard is not None else jnp.zeros((), _F32)
        packed = _pack(
            stats,
            skipped,
            reason,
            skip_total,
            jnp.nan if loss is None else loss,
            jnp.nan if lr is None else lr,
        )
        self._rows.append((int(step), packed))
        if len(self._rows) >= self.log_every:
            return self.flush()
        return None

    def flush(self) -> HostBatch | None:
        """Copy the buffered steps to the host in one transfer and record them."""
        rows, self._rows = self._rows, []
        if not rows:
            return self.host.flush()
        host = np.asarray(jax.device_get(jnp.stack([r[1] for r in rows])), dtype=np.float64)
        self.transfers += 1
        n = host.shape[1] - _HEAD
        if self._names is None:
            self._names = tuple(f"leaves[{i}]" for i in range(n))
        self.host.start(self._names, self._shapes)
        batch = None
        for (step, _), v in zip(rows, host):
            skipped = bool(v[4])
            norms = v[_HEAD:]
            out = self.host.record(
                step,
                total_norm=v[0],
                clipped_norm=v[1],
                clip_coef=v[2],
                threshold=v[3],
                skipped=skipped,
                reason=int(v[5]) if skipped else 0,
                loss=None if math.isnan(v[6]) else v[6],
                lr=None if math.isnan(v[7]) else v[7],
                tensor_norms=norms.tolist(),
                clipped=0.0 if skipped else float(v[2] < 1.0),
            )
            if skipped:
                reason = SkipReason(int(v[5])).label
                bad = [name for name, x in zip(self._names, norms) if not math.isfinite(x)]
                self.host.event(skip_event(step, reason, bad if reason == "nonfinite" else []))
            batch = out or batch
        return self.host.flush() or batch

    def close(self) -> None:
        """Record what is buffered and close the store and sinks."""
        try:
            self.flush()
        finally:
            self.host.close()

    def __enter__(self) -> JaxRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""JAX/optax front-end: gradguard policies as optax transformations, and recording.

Every transformation here is an ``optax.GradientTransformation`` whose state carries a
:class:`ClipStats` (pre-clip global norm, per-leaf norms, clip coefficient, threshold)
next to any adaptive state (ZClip's EMAs, AutoClip's window). Everything is pure and
``jit``-compatible; nothing syncs with the host.

Recording from a jitted step: the stats travel out of the step inside the optax state
the step already returns. :class:`JaxRecorder` takes that state each step, packs its
stats into one small device array (an asynchronous dispatch, so the step is not
waited for) and pulls an interval's worth to the host in one ``jax.device_get`` every
``log_every`` steps. We do not use ``jax.debug.callback``: it would run a host callback
inside every compiled step (a device→host copy and a runtime round trip per step on an
accelerator, repeated per device under ``pmap``/sharding, and serialising with
``ordered=True``), while the state route costs one transfer per interval and keeps the
compiled step free of side effects.

Fixed policies give the same updates as optax's own:
:func:`clip_norm` as ``optax.clip_by_global_norm``, :func:`clip_value` as
``optax.clip``, :func:`agc` as ``optax.adaptive_grad_clip``.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _validate as check
from ..record import RunStore
from ..schema import Event, EventKind, HostBatch, Sink
from ._host import HostRecorder

_F32 = jnp.float32


class ClipStats(NamedTuple):
    """What a gradguard transformation measured at its last update (device arrays)."""

    total_norm: jax.Array  # global L2 norm before clipping
    clipped_norm: jax.Array  # global L2 norm after clipping
    clip_coef: jax.Array  # clipped_norm / total_norm (1 when nothing was clipped)
    threshold: jax.Array  # threshold in force (inf when none)
    norms: jax.Array  # per-leaf L2 norms before clipping, in tree-leaf order


class StatsState(NamedTuple):
    """State of a transformation without adaptive state."""

    stats: ClipStats


class ZClipState(NamedTuple):
    """ZClip's state: warm-up sums, EMA mean/variance, and the last stats."""

    stats: ClipStats
    n: jax.Array
    sum: jax.Array
    sumsq: jax.Array
    mean: jax.Array
    var: jax.Array


class AutoClipState(NamedTuple):
    """AutoClip's state: a window of past finite norms (NaN where empty)."""

    stats: ClipStats
    window: jax.Array
    count: jax.Array


class SkipState(NamedTuple):
    """State of :func:`skip_nonfinite`: the wrapped state, this step's flag and a count."""

    inner: Any
    skipped: jax.Array
    total_norm: jax.Array
    skips: jax.Array


# ------------------------------------------------------------------- measurement
def leaf_names(tree: Any) -> tuple[str, ...]:
    """Dotted names of a pytree's leaves (``params.Dense_0.kernel``), in leaf order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return tuple(_path_name(path) for path, _ in flat)


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) or "<root>"


def _sq_norms(tree: Any) -> list[jax.Array]:
    """Per-leaf sums of squares, as optax's ``tree.norm`` computes them."""
    return [
        jnp.sum(jnp.square(leaf.real) + jnp.square(leaf.imag))
        if jnp.iscomplexobj(leaf)
        else jnp.sum(jnp.square(leaf))
        for leaf in jax.tree.leaves(tree)
    ]


def measure(tree: Any) -> tuple[jax.Array, jax.Array]:
    """``(per-leaf norms, global norm)`` of a gradient tree; the global norm equals
    ``optax.tree.norm(tree)`` bit for bit (same per-leaf sums, same order of addition)."""
    sq = _sq_norms(tree)
    if not sq:
        zero = jnp.zeros((), _F32)
        return jnp.zeros((0,), _F32), zero
    total = jnp.sqrt(functools.reduce(operator.add, sq, 0))
    norms = jnp.sqrt(jnp.stack([s.astype(_F32) for s in sq]))
    return norms, total


def _global(norms: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(norms)))


def _stats(norms, total, clipped_norm, coef, threshold) -> ClipStats:
    return ClipStats(
        total_norm=jnp.asarray(total, _F32),
        clipped_norm=jnp.asarray(clipped_norm, _F32),
        clip_coef=jnp.asarray(coef, _F32),
        threshold=jnp.asarray(threshold, _F32),
        norms=norms,
    )


def _empty_stats(params: Any) -> ClipStats:
    n = len(jax.tree.leaves(params))
    nan = jnp.full((), jnp.nan, _F32)
    return ClipStats(nan, nan, jnp.ones((), _F32), jnp.full((), jnp.inf, _F32), jnp.zeros(n, _F32))


def _coefficient(limit: jax.Array, norm: jax.Array) -> jax.Array:
    """gradguard's (torch's) clip coefficient: ``min(limit / (norm + 1e-6), 1)``."""
    return jnp.minimum(limit / (norm + 1e-6), 1.0)


def _scale(tree: Any, coef: jax.Array) -> Any:
    return jax.tree.map(lambda t: t * coef.astype(t.dtype), tree)


def _ratio(after: jax.Array, before: jax.Array) -> jax.Array:
    return jnp.where(before > 0, after / jnp.where(before > 0, before, 1.0), 1.0)


# ------------------------------------------------------------------- fixed policies
def clip_norm(max_norm: float) -> optax.GradientTransformation:
    """Clip the global L2 norm to ``max_norm``; same updates as
    ``optax.clip_by_global_norm(max_norm)``."""
    max_norm = check.non_negative("max_norm", max_norm)

    def update(updates, state, params=None):
        del params
        norms, total = measure(updates)
        keep = total < max_norm
        out = jax.tree.map(
            lambda t: jax.lax.select(keep, t, (t / total.astype(t.dtype)) * max_norm), updates
        )
        coef = jnp.where(keep, 1.0, max_norm / total)
        return out, StatsState(_stats(norms, total, total * coef, coef, max_norm))

    return optax.GradientTransformation(lambda p: StatsState(_empty_stats(p)), update)


def clip_value(clip_value: float) -> optax.GradientTransformation:
    """Clamp every element to ``[-clip_value, clip_value]``; same as ``optax.clip``."""
    limit = check.non_negative("clip_value", clip_value)

    def update(updates, state, params=None):
        del params
        norms, total = measure(updates)
        out = jax.tree.map(lambda t: jnp.clip(t, -limit, limit), updates)
        after = _global(measure(out)[0])
        return out, StatsState(_stats(norms, total, after, _ratio(after, total), jnp.inf))

    return optax.GradientTransformation(lambda p: StatsState(_empty_stats(p)), update)


def clip_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Clip each leaf's L2 norm to ``max_norm`` on its own (Paddle's ``ClipGradByNorm``)."""
    max_norm = check.non_negative("max_norm", max_norm)

    def update(updates, state, params=None):
        del params
        norms, total = measure(updates)
        leaves, treedef = jax.tree.flatten(updates)
        coefs = jnp.where(norms > max_norm, max_norm / jnp.where(norms > 0, norms, 1.0), 1.0)
        out = treedef.unflatten([t * coefs[i].astype(t.dtype) for i, t in enumerate(leaves)])
        after = _global(norms * coefs)
        return out, StatsState(_stats(norms, total, after, _ratio(after, total), max_norm))

    return optax.GradientTransformation(lambda p: StatsState(_empty_stats(p)), update)


def agc(clip_factor: float = 0.01, eps: float = 1e-3, axis: Any = None):
    """Unit-wise adaptive clipping; same updates as ``optax.adaptive_grad_clip``.

    optax's unit convention is the one for JAX's (in, out) kernels: norms are taken
    over every axis but the last (see ``optax.unitwise_norm``).
    """
    clip_factor = check.positive("clip_factor", clip_factor)
    eps = check.non_negative("eps", eps)
    return with_stats(optax.adaptive_grad_clip(clip_factor, eps, axis))


def with_stats(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap any optax transformation so its state also records :class:`ClipStats`."""

    class WrappedState(NamedTuple):
        stats: ClipStats
        inner: Any

    def init(params):
        return WrappedState(_empty_stats(params), inner.init(params))

    def update(updates, state, params=None):
        norms, total = measure(updates)
        out, inner_state = inner.update(updates, state.inner, params)
        after = _global(measure(out)[0])
        stats = _stats(norms, total, after, _ratio(after, total), jnp.inf)
        return out, WrappedState(stats, inner_state)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------- adaptive policies
def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    max_norm: float | None = None,
    warmup_max_norm: float | None = None,
    eps: float = 1e-6,
) -> optax.GradientTransformation:
    """ZClip (Kumar et al. 2025) with the same rule and arguments as
    :class:`gradguard.ZClip`; its EMAs live in :class:`ZClipState`.

    The first ``warmup_steps`` finite norms initialise mean and variance; afterwards a
    norm whose z-score exceeds ``z_thresh`` is clipped to ``μ + z_thresh²·σ/z`` and the
    EMAs follow the clipped norm. Non-finite norms never enter the statistics.
    """
    alpha = check.in_open_unit("alpha", alpha)
    z_thresh = check.positive("z_thresh", z_thresh)
    warmup_steps = check.positive_int("warmup_steps", warmup_steps)
    max_norm = None if max_norm is None else check.non_negative("max_norm", max_norm)
    if warmup_max_norm is not None:
        warmup_max_norm = check.non_negative("warmup_max_norm", warmup_max_norm)
    eps = check.positive("eps", eps)

    def init(params):
        zero = jnp.zeros((), _F32)
        return ZClipState(_empty_stats(params), zero, zero, zero, zero, zero)

    def update(updates, state, params=None):
        del params
        norms, total = measure(updates)
        g = total.astype(_F32)
        finite = jnp.isfinite(g)
        g0 = jnp.where(finite, g, 0.0)
        ready = state.n >= warmup_steps
        collect = finite & ~ready
        # Warm-up statistics from the norms actually applied (capped), as gradguard.ZClip.
        applied = g0 if warmup_max_norm is None else jnp.minimum(g0, warmup_max_norm)
        s = state.sum + jnp.where(collect, applied, 0.0)
        sq = state.sumsq + jnp.where(collect, applied * applied, 0.0)
        n = state.n + collect.astype(_F32)
        now_ready = ~ready & (n >= warmup_steps)
        first_mean = s / jnp.maximum(n, 1.0)
        first_var = jnp.maximum(sq / jnp.maximum(n, 1.0) - first_mean**2, 0.0)

        std = jnp.sqrt(state.var)
        z = (g0 - state.mean) / (std + eps)
        spike = ready & finite & (z > z_thresh)
        target = state.mean + z_thresh**2 * std / jnp.maximum(z, eps)
        coef = jnp.where(spike, _coefficient(target, g), 1.0)

        effective = jnp.where(spike, target, g0)
        new_mean = alpha * state.mean + (1 - alpha) * effective
        new_var = alpha * state.var + (1 - alpha) * (effective - new_mean) ** 2
        upd = ready & finite
        mean = jnp.where(upd, new_mean, jnp.where(now_ready, first_mean, state.mean))
        var = jnp.where(upd, new_var, jnp.where(now_ready, first_var, state.var))

        threshold = jnp.where(spike, target, jnp.where(ready, state.mean + z_thresh * std, jnp.inf))
        if warmup_max_norm is not None:
            coef = jnp.where(ready, coef, jnp.minimum(coef, _coefficient(warmup_max_norm, g)))
            threshold = jnp.where(ready, threshold, jnp.minimum(threshold, warmup_max_norm))
        if max_norm is not None:
            coef = jnp.minimum(coef, _coefficient(max_norm, g))
            threshold = jnp.minimum(threshold, max_norm)
        stats = _stats(norms, g, g * coef, coef, threshold)
        return _scale(updates, coef), ZClipState(stats, n, s, sq, mean, var)

    return optax.GradientTransformation(init, update)


def autoclip(percentile: float = 10.0, history: int = 1000) -> optax.GradientTransformation:
    """AutoClip (Seetharaman et al. 2020) over a sliding window of ``history`` steps.

    Clips the global norm at the ``percentile``-th percentile (linear interpolation) of
    the finite norms in the window, this step's included, like :class:`gradguard.AutoClip`
    with ``history=`` an int. An unbounded history has no static shape, so jit needs a
    window.
    """
    percentile = check.in_range("percentile", percentile, 0.0, 100.0)
    history = check.positive_int("history", history)

    def init(params):
        window = jnp.full((history,), jnp.nan, _F32)
        return AutoClipState(_empty_stats(params), window, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        norms, total = measure(updates)
        g = total.astype(_F32)
        value = jnp.where(jnp.isfinite(g), g, jnp.nan)
        window = state.window.at[state.count % history].set(value)
        threshold = jnp.nanpercentile(window, percentile)
        threshold = jnp.where(jnp.isnan(threshold), jnp.inf, threshold)
        coef = _coefficient(threshold, g)
        stats = _stats(norms, g, g * coef, coef, threshold)
        return _scale(updates, coef), AutoClipState(stats, window, state.count + 1)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------- skipping
def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip steps whose gradients hold NaN or inf: zero updates, ``inner``'s state kept.

    Wrap the whole optimizer (``skip_nonfinite(optax.chain(zclip(), optax.adam(1e-3)))``)
    so that neither the clip statistics nor the moments see a bad step. Unlike
    ``optax.apply_if_finite`` it never gives up: a skip rule must not end a run.
    """

    def init(params):
        zero = jnp.zeros((), _F32)
        return SkipState(inner.init(params), jnp.zeros((), bool), zero, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        _, total = measure(updates)
        bad = ~jnp.isfinite(total)
        out, new_inner = inner.update(updates, state.inner, params)
        out = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), out)
        kept = jax.tree.map(lambda new, old: jnp.where(bad, old, new), new_inner, state.inner)
        return out, SkipState(kept, bad, total.astype(_F32), state.skips + bad.astype(jnp.int32))

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------- reading the state
def find_stats(state: Any) -> tuple[ClipStats | None, SkipState | None]:
    """The first :class:`ClipStats` and :class:`SkipState` in an optax state tree."""
    found: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, ClipStats):
            found.setdefault("stats", node)
            return
        if isinstance(node, SkipState):
            found.setdefault("skip", node)
            visit(node.inner)
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found.get("stats"), found.get("skip")


@jax.jit
def _pack(stats: ClipStats, skipped, skip_total, loss, lr) -> jax.Array:
    """One f32 vector per step (a fresh buffer, so donating the state is safe)."""
    head = jnp.stack(
        [
            jnp.where(skipped, skip_total, stats.total_norm),
            jnp.where(skipped, jnp.nan, stats.clipped_norm),
            jnp.where(skipped, jnp.nan, stats.clip_coef),
            stats.threshold,
            skipped.astype(_F32),
            jnp.asarray(loss, _F32),
            jnp.asarray(lr, _F32),
        ]
    )
    return jnp.concatenate([head, stats.norms.astype(_F32)])


class JaxRecorder:
    """Record a JAX training run to a gradguard run store without blocking its steps.

    Call :meth:`record` after each step with the optax state the step returned; the
    state's :class:`ClipStats` (and :class:`SkipState`, if any) are packed on the
    device and copied to the host once every ``log_every`` steps.

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
        stats, skip = find_stats(opt_state)
        if stats is None:
            raise ValueError(
                "opt_state holds no gradguard ClipStats: build the optimizer with a "
                "gradguard.frontends.jax transformation (clip_norm, zclip, with_stats, ...)"
            )
        skipped = skip.skipped if skip is not None else jnp.zeros((), bool)
        skip_total = skip.total_norm if skip is not None else jnp.zeros((), _F32)
        packed = _pack(
            stats,
            skipped,
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
        n = host.shape[1] - 7
        if self._names is None:
            self._names = tuple(f"leaves[{i}]" for i in range(n))
        self.host.start(self._names, self._shapes)
        batch = None
        for (step, _), v in zip(rows, host):
            skipped = bool(v[4])
            out = self.host.record(
                step,
                total_norm=v[0],
                clipped_norm=v[1],
                clip_coef=v[2],
                threshold=v[3],
                skipped=skipped,
                reason=1 if skipped else 0,  # SkipReason.NONFINITE
                loss=None if math.isnan(v[5]) else v[5],
                lr=None if math.isnan(v[6]) else v[6],
                tensor_norms=v[7:].tolist(),
                clipped=0.0 if skipped else float(v[2] < 1.0),
            )
            if skipped:
                self.host.event(Event(step, EventKind.SKIP, f"step {step} skipped (nonfinite)", {}))
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


__all__ = [
    "AutoClipState",
    "ClipStats",
    "JaxRecorder",
    "SkipState",
    "StatsState",
    "ZClipState",
    "agc",
    "autoclip",
    "clip_norm",
    "clip_tensor_norm",
    "clip_value",
    "find_stats",
    "leaf_names",
    "measure",
    "skip_nonfinite",
    "with_stats",
    "zclip",
]

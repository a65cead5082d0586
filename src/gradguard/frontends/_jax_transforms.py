"""gradguard policies as optax transformations (see :mod:`gradguard.frontends.jax`).

Every gradguard policy runs here with the very update the torch ``Guard`` runs (written
once over :mod:`gradguard.ops`; JAX arrays, ``lax.cond`` where torch branches on the host):

* :func:`transform` turns a clipping policy into an ``optax.GradientTransformation``;
* :func:`guard` wraps a whole optimizer, so a policy may also *skip* steps (updates
  zeroed, the optimizer's state kept), like :class:`gradguard.Guard`; the loss, when
  passed as optax's ``value`` extra argument, reaches the policies;
* :func:`zclip`, :func:`autoclip`, :func:`clip_tensor_norm`, :func:`skip_nonfinite` are
  shorthands with the torch policies' arguments and defaults.

Every state carries a :class:`ClipStats` (pre-clip global norm, per-leaf norms, clip
coefficient, threshold). Everything is pure and ``jit``-compatible; nothing syncs with
the host. Three fixed clips give exactly optax's own updates instead:
:func:`clip_norm` as ``optax.clip_by_global_norm``, :func:`clip_value` as ``optax.clip``,
:func:`agc` as ``optax.adaptive_grad_clip``.

"""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import _validate as check
from ..layers import dotted_name
from ..ops.jax import JAX
from ..policies import AutoClip, ClipTensorNorm, Policy, SkipNonFinite, StepInputs, ZClip
from ..policies.base import Decision
from ..result import outcome

_F32 = jnp.float32

# Decisions pass through ``lax.cond`` and ``jit``: register them as pytrees (once).
jax.tree_util.register_pytree_node(
    Decision, lambda d: (d.arrays(), tuple(d.transforms)), Decision.from_arrays
)


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


class PolicyState(NamedTuple):
    """State of :func:`transform`: the stats, the policy's own state, the step index."""

    stats: ClipStats
    policy: Any
    step: jax.Array


class GuardState(NamedTuple):
    """State of :func:`guard`: the wrapped optimizer's state (kept on skipped steps), the
    policy's state, this step's stats, skip flag and reason, and the number of skips."""

    inner: Any
    policy: Any
    stats: ClipStats
    skipped: jax.Array
    reason: jax.Array
    total_norm: jax.Array
    skips: jax.Array
    step: jax.Array


#: The state :func:`skip_nonfinite` returns (a :class:`GuardState`).
SkipState = GuardState


# ------------------------------------------------------------------- measurement
def leaf_names(tree: Any) -> tuple[str, ...]:
    """Dotted names of a pytree's leaves (``params.Dense_0.kernel``), in leaf order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return tuple(dotted_name(_key(k) for k in path) for path, _ in flat)


def _key(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


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


def _ratio(after: jax.Array, before: jax.Array) -> jax.Array:
    return jnp.where(before > 0, after / jnp.where(before > 0, before, 1.0), 1.0)


def _inputs(norms: jax.Array, total: jax.Array, step: Any, loss: Any = None) -> StepInputs:
    loss = None if loss is None else jnp.asarray(loss, _F32)
    return StepInputs(total.astype(_F32), norms, JAX, step, loss)


def _blank_inputs(params: Any) -> StepInputs:
    n = len(jax.tree.leaves(params))
    return _inputs(jnp.zeros(n, _F32), jnp.zeros((), _F32), jnp.zeros((), jnp.int32))


def _decide(policy: Policy, state: Any, updates: Any, step: Any, loss: Any = None):
    """Run ``policy``'s update on ``updates``: ``(scaled updates, decision, state, stats)``."""
    norms, total = measure(updates)
    inputs = _inputs(norms, total, step, loss)
    xp = inputs.xp
    decision, state = policy.update(state, inputs, xp)
    if decision.transforms:
        raise TypeError(
            f"{policy!r} transforms torch gradients in place; in JAX use clip_value() or agc()"
        )
    leaves, treedef = jax.tree.flatten(updates)
    if decision.tensor_scale is not None:
        leaves = [t * decision.tensor_scale[i].astype(t.dtype) for i, t in enumerate(leaves)]
    if decision.scale is not None:
        leaves = [t * decision.scale.astype(t.dtype) for t in leaves]
    clipped, coef, threshold = outcome(inputs, decision, None)
    stats = _stats(norms, total, clipped, coef, threshold)
    return treedef.unflatten(leaves), decision, state, stats


# ------------------------------------------------------------------- any policy
def transform(policy: Policy) -> optax.GradientTransformation:
    """A gradguard clipping policy as an optax transformation (same update as in torch).

    A policy that may skip steps needs the optimizer's state: use :func:`guard`.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")

    def init(params):
        inputs = _blank_inputs(params)
        return PolicyState(_empty_stats(params), policy.init(inputs, inputs.xp), inputs.step)

    def update(updates, state, params=None):
        del params
        out, decision, inner, stats = _decide(policy, state.policy, updates, state.step)
        if decision.skip is not None:
            raise TypeError(
                f"{policy!r} skips steps: wrap the optimizer with guard(optimizer, policy)"
            )
        return out, PolicyState(stats, inner, state.step + 1)

    return optax.GradientTransformation(init, update)


def guard(
    optimizer: optax.GradientTransformation, policy: Policy | None = None
) -> optax.GradientTransformationExtraArgs:
    """Run ``policy`` (default :func:`gradguard.default_policy`) before ``optimizer``.

    The JAX counterpart of :class:`gradguard.Guard`: the policy's scales are applied to
    the gradients the optimizer sees; on a skipped step the updates are zeros and the
    optimizer's state is kept as it was. Unlike ``optax.apply_if_finite`` it never gives
    up: a skip rule must not end a run. Pass the loss as ``value=`` (optax's extra
    argument) for loss-aware policies.
    """
    from ..policies import default_policy

    policy = default_policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")

    def init(params):
        inputs = _blank_inputs(params)
        zero = jnp.zeros((), _F32)
        count = jnp.zeros((), jnp.int32)
        return GuardState(
            optimizer.init(params),
            policy.init(inputs, inputs.xp),
            _empty_stats(params),
            jnp.zeros((), bool),
            jnp.zeros((), jnp.int8),
            zero,
            count,
            count,
        )

    def update(updates, state, params=None, **extra_args):
        loss = extra_args.get("value")
        scaled, decision, inner_policy, stats = _decide(
            policy, state.policy, updates, state.step, loss
        )
        filled = decision.filled(JAX, len(stats.norms))
        skip, reason = filled.skip, jnp.where(filled.skip, filled.reason, 0).astype(jnp.int8)
        if isinstance(optimizer, optax.GradientTransformationExtraArgs):
            out, new_inner = optimizer.update(scaled, state.inner, params, **extra_args)
        else:
            out, new_inner = optimizer.update(scaled, state.inner, params)
        out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), out)
        kept = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_inner, state.inner)
        return out, GuardState(
            kept,
            inner_policy,
            stats,
            skip,
            reason,
            stats.total_norm,
            state.skips + skip.astype(jnp.int32),
            state.step + 1,
        )

    return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------- shorthands
def zclip(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
    """:class:`gradguard.ZClip` (Kumar et al. 2025) as an optax transformation; the same
    arguments and defaults."""
    return transform(ZClip(*args, **kwargs))


def autoclip(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
    """:class:`gradguard.AutoClip` (Seetharaman et al. 2020) as an optax transformation.

    The same arguments and defaults as in torch: every past norm, exactly for
    ``exact_until`` steps, then log-binned (the state holds both arrays: shapes are static
    under jit).
    """
    return transform(AutoClip(*args, **kwargs))


def clip_tensor_norm(max_norm: float) -> optax.GradientTransformation:
    """Clip each leaf's L2 norm to ``max_norm`` on its own (:class:`gradguard.ClipTensorNorm`)."""
    return transform(ClipTensorNorm(max_norm))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Skip steps whose gradients hold NaN or inf: ``guard(inner, SkipNonFinite())``.

    Wrap the whole optimizer (``skip_nonfinite(optax.chain(zclip(), optax.adam(1e-3)))``)
    so that neither the clip statistics nor the moments see a bad step.
    """
    return guard(inner, SkipNonFinite())


# ------------------------------------------------------------------- optax-exact clips
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
    return with_stats(optax.clip(check.non_negative("clip_value", clip_value)))


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


def find_stats(state: Any) -> tuple[ClipStats | None, GuardState | None]:
    """The first :class:`ClipStats` and :class:`GuardState` in an optax state tree.

    A clip inside a guarded optimizer (``guard(optax.chain(zclip(), ...))``) describes the
    clipping applied, so its stats win over the guard's own.
    """
    found: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, GuardState):
            found.setdefault("guard", node)
            visit(node.inner)
            found.setdefault("stats", node.stats)
            return
        if isinstance(node, ClipStats):
            found.setdefault("stats", node)
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found.get("stats"), found.get("guard")

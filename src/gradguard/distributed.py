"""Exact gradient norms under ``torch.distributed``: DDP, FSDP2 and DTensor (tensor parallel).

**DDP.** After ``backward()`` every rank holds the same averaged gradients, so
:func:`gradguard.measure` and :class:`gradguard.Guard` need no communication at all and
every rank takes the same decision from the same numbers. Inside ``no_sync()``
accumulation call ``guard.step(..., sync=False)`` (or use ``guard.accumulating()``):
nothing is measured until the synchronised micro-batch.

**FSDP2 / DTensor.** A sharded gradient's norm cannot be read off the local shard. For
each gradient, the local shard's p-norm is computed with the usual foreach kernels, raised
to the p-th power (in float64), and the per-tensor powers of all gradients on one device
mesh travel in **one** ``all_reduce(SUM)`` (``MAX`` for ``inf``). Mesh dimensions along
which a gradient is replicated are masked out (only coordinate 0 contributes) so that
replicas are not counted twice; this makes 2-D meshes (data x tensor parallel, HSDP) exact.
Gradients on different meshes are grouped by mesh, one reduction each. The reduced vector
is bit-identical on every rank, so every policy sees the same numbers, takes the same
clip/skip decision, and keeps the same adaptive state.

**Cost model** (per step, ``n_m`` gradients on mesh ``m``, ``R_m`` ranks in it):

* DDP / plain tensors: 0 bytes.
* DTensor, finite p: one all-reduce of ``8 * n_m`` bytes per mesh (float64 powers);
  ``inf``: one all-reduce of ``16 * n_m`` bytes (max and a NaN flag per tensor). A ring
  all-reduce moves about ``2 * (R_m - 1) / R_m`` times that per rank, i.e. under
  ``16 * n_m`` (``32 * n_m``) bytes, independent of the gradient sizes. A model with 1,000
  parameter tensors sends under 16 kB per step, however many ranks.
* A mesh that does not span the whole world and has ``k > 1`` dimensions costs ``k``
  all-reduces of the same vector (one per mesh dimension).
* ``max_abs`` / ``zero_fraction`` (off by default) add one reduction of ``n_m`` values each.
* Naming the rank of a non-finite gradient (:func:`nonfinite_ranks`) costs one
  ``all_gather`` of one byte per rank, and only on steps that are skipped as non-finite.
* :func:`watch_ddp` reads each gradient bucket once more (``isfinite``) before its
  all-reduce, on the device, without a host sync.

**Per-rank anomalies.** With DDP a NaN on one rank is averaged into every rank's
gradients, so the all-reduced gradients cannot say where it came from; :func:`watch_ddp`
installs a communication hook that flags each rank's local buckets before the all-reduce.
With DTensor the flag is the local shard's (after FSDP2's reduce-scatter: the ranks whose
shard holds the bad values, not necessarily the rank whose batch produced them).

**Limits.** Measuring DTensor gradients is a collective: every rank of the meshes must
call it at the same step (``Guard.step`` does). A gradient with a pending ``Partial``
reduction is refused with a clear error. Pipeline parallelism, where each stage holds
different parameters, is not covered: each stage would measure only its own gradients.
Element-wise policy transforms (``ClipValue``) run on the DTensors themselves; scales
are applied to the local shards.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _foreach

__all__ = [
    "DDPWatch",
    "ShardedNorms",
    "has_dtensor",
    "local_tensors",
    "nonfinite_ranks",
    "sharded_norms",
    "watch_ddp",
]


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """``True`` if any tensor is a DTensor (cheap: plain tensors are recognised by type)."""
    if {type(t) for t in tensors} <= {Tensor}:
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The local shard of each DTensor (sharing its storage); plain tensors as they are."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    with torch.no_grad():  # outside autograd, to_local() is a plain attribute read
        return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


# -- the reduction plan --------------------------------------------------------------------


@dataclass(frozen=True)
class _MeshPart:
    """The gradients living on one mesh and how to reduce them."""

    indices: Tensor  # positions in the full vector (long, on the device)
    keep: Tensor | None  # bool mask: False where this rank is a replica (not coordinate 0)
    groups: tuple[Any, ...]  # process groups; reduce over each in turn
    all_positions: bool  # indices cover the whole vector in order


def _layout(grads: Sequence[Tensor]) -> tuple:
    """Per gradient ``(mesh, placements)``, or ``None`` for a plain tensor: the plan's key."""
    dtensor = _dtensor_type()
    return tuple(
        (g.device_mesh, g.placements) if isinstance(g, dtensor) else None  # type: ignore[arg-type]
        for g in grads
    )


class _PendingReduction(Exception):
    """Raised by :func:`_plan` for a ``Partial`` gradient (the caller names it)."""


@functools.lru_cache(maxsize=16)
def _plan(layout: tuple, device: torch.device, world_group: Any) -> tuple[_MeshPart, ...]:
    # world_group is part of the cache key: a re-initialised process group gets a new plan.
    by_mesh: dict[Any, list[int]] = {}
    for i, entry in enumerate(layout):
        if entry is not None:
            if any(p.is_partial() for p in entry[1]):
                raise _PendingReduction(i)  # not cached: raised again each call
            by_mesh.setdefault(entry[0], []).append(i)
    parts = []
    for mesh, positions in by_mesh.items():
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError("parameters: a DTensor gradient lives on a mesh without this rank")
        keep = []
        for i in positions:
            placements = layout[i][1]
            keep.append(all(c == 0 for c, p in zip(coord, placements) if p.is_replicate()))
        world = torch.distributed.get_world_size()
        if mesh.ndim == 1:
            groups: tuple[Any, ...] = (mesh.get_group(0),)
        elif mesh.size() == world:
            groups = (world_group,)
        else:
            groups = tuple(mesh.get_group(d) for d in range(mesh.ndim))
        parts.append(
            _MeshPart(
                indices=torch.tensor(positions, dtype=torch.long, device=device),
                keep=None if all(keep) else torch.tensor(keep, device=device),
                groups=groups,
                all_positions=positions == list(range(len(layout))),
            )
        )
    return tuple(parts)


def _all_reduce(values: Tensor, plan: Sequence[_MeshPart], op: Any, fill: float) -> Tensor:
    """Reduce ``values[part.indices]`` over each part's groups; replicas contribute ``fill``."""
    out = values
    for part in plan:
        chunk = values if part.all_positions else values.index_select(0, part.indices)
        if part.keep is not None:
            chunk = torch.where(part.keep, chunk, torch.full_like(chunk, fill))
        elif part.all_positions:
            chunk = chunk.clone()
        for group in part.groups:
            torch.distributed.all_reduce(chunk, op=op, group=group)
        out = chunk if part.all_positions else out.index_copy(0, part.indices, chunk)
    return out


# -- measurement ---------------------------------------------------------------------------


class ShardedNorms(NamedTuple):
    """Exact norms of DTensor gradients, the same on every rank (see the module docstring)."""

    norms: Tensor
    total: Tensor
    max_abs: Tensor | None
    zero_fraction: Tensor | None
    local_nonfinite: Tensor  #: this rank's shards held NaN/inf before the reduction


def sharded_norms(
    grads: Sequence[Tensor],
    norm_type: float,
    *,
    names: Sequence[str] | None = None,
    foreach: bool | None = None,
    dtype: torch.dtype | None = None,
    max_abs: bool = False,
    zero_fraction: bool = False,
) -> ShardedNorms:
    """Per-tensor and global norms of a gradient list holding DTensors.

    :func:`gradguard.measure` calls it for DTensor gradients. Exact global and per-tensor
    norms from the local shards, with one all-reduce per mesh (see the module docstring).
    Plain tensors in the list are taken as they are (they are replicated, as with DDP).
    Every rank of the meshes involved must call it.
    """
    layout = _layout(grads)
    local = local_tensors(grads)
    device = local[0].device
    try:
        plan = _plan(layout, device, torch.distributed.group.WORLD)
    except _PendingReduction as pending:
        i = pending.args[0]
        label = repr(names[i]) if names is not None else f"parameters[{i}]"
        raise ValueError(
            f"parameters: the gradient of {label} is a DTensor with a pending reduction "
            f"({layout[i][1]}); its norm is undefined until it is reduced. Call "
            "grad.redistribute(...) to Shard/Replicate placements first."
        ) from None
    if math.isinf(norm_type):
        # An uneven split can leave a rank an empty shard, whose max norm is undefined: 0.
        local = [t if t.numel() else t.new_zeros(1) for t in local]
    local_norms = _foreach.stacked_norms(local, norm_type, foreach, dtype, device)[0]
    out_dtype = local_norms.dtype
    local_bad = ~torch.isfinite(local_norms).all()
    SUM, MAX = torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MAX
    if math.isinf(norm_type):
        n = len(grads)
        # MAX does not reliably keep NaN: reduce a NaN flag per tensor beside the maxima.
        nan = local_norms.isnan()
        values = torch.where(nan, 0.0, local_norms.double())
        reduced = _all_reduce_packed(torch.cat([values, nan.double()]), plan, n, MAX)
        norms = torch.where(reduced[n:] > 0, torch.nan, reduced[:n])
        total = norms.max()  # propagates NaN
    else:
        powers = _all_reduce(local_norms.double().pow(norm_type), plan, SUM, 0.0)
        norms = powers.pow(1.0 / norm_type)
        total = powers.sum().pow(1.0 / norm_type)
    extra_max = extra_zero = None
    if max_abs:
        extra_max = _all_reduce(_foreach.max_abs(local, device).double(), plan, MAX, 0.0).float()
    if zero_fraction:
        zeros = _all_reduce(_foreach.zero_counts(local, device), plan, SUM, 0.0)
        sizes = torch.tensor([max(g.numel(), 1) for g in grads], device=device)
        extra_zero = (zeros / sizes).float()
    return ShardedNorms(norms.to(out_dtype), total.to(out_dtype), extra_max, extra_zero, local_bad)


def _all_reduce_packed(packed: Tensor, plan: Sequence[_MeshPart], n: int, op: Any) -> Tensor:
    """Reduce a ``[values; flags]`` vector of length ``2n`` with the plan of ``n`` tensors."""
    doubled = [
        _MeshPart(
            torch.cat([p.indices, p.indices + n]),
            None if p.keep is None else torch.cat([p.keep, p.keep]),
            p.groups,
            p.all_positions,
        )
        for p in plan
    ]
    return _all_reduce(packed, doubled, op, 0.0)


# -- per-rank anomalies --------------------------------------------------------------------


def nonfinite_ranks(local_flag: Tensor, group: Any = None) -> list[int]:
    """Ranks whose ``local_flag`` (a 0-d bool tensor) is set: one tiny all-gather. Syncs.

    Collective: every rank of ``group`` must call it (a guard does so on steps every rank
    skips as non-finite, which all ranks agree on).
    """
    dist = torch.distributed
    world = dist.get_world_size(group)
    flag = local_flag.reshape(1).to(torch.uint8)
    gathered = [torch.zeros_like(flag) for _ in range(world)]
    dist.all_gather(gathered, flag, group=group)
    flags = torch.cat(gathered).tolist()
    if group is None:
        return [rank for rank, bad in enumerate(flags) if bad]
    return [dist.get_global_rank(group, r) for r, bad in enumerate(flags) if bad]


class DDPWatch:
    """State of :func:`watch_ddp`: ``nonfinite`` is this rank's flag for the last backward."""

    def __init__(self, inner: Callable, inner_state: Any) -> None:
        self.inner = inner
        self.inner_state = inner_state
        self.nonfinite: Tensor | None = None


def watch_ddp(
    model: torch.nn.parallel.DistributedDataParallel,
    hook: Callable | None = None,
    state: Any = None,
) -> DDPWatch:
    """Flag non-finite local gradients on each rank before DDP all-reduces them.

    Registers a DDP communication hook that checks each bucket (``isfinite``, on the
    device, no host sync) and then runs ``hook`` (default: DDP's plain all-reduce; pass
    your own compression hook and its ``state`` to keep it). A :class:`~gradguard.Guard`
    that skips a non-finite step then names the ranks the NaN/inf came from.
    Call it once, before the first backward; DDP allows one communication hook.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if hook is None:
        hook, state = default_hooks.allreduce_hook, None
    watch = DDPWatch(hook, state)

    def checked(watch, bucket):  # unannotated: DDP checks the annotations it is given
        bad = ~torch.isfinite(bucket.buffer()).all()
        # Buckets are reduced in index order: bucket 0 opens a new backward pass.
        if bucket.index() == 0 or watch.nonfinite is None:
            watch.nonfinite = bad
        else:
            watch.nonfinite = watch.nonfinite | bad
        return watch.inner(watch.inner_state, bucket)

    model.register_comm_hook(watch, checked)
    _WATCHES.add(watch)
    return watch


# The DDP reducer holds each watch as its hook state: a watch goes when its model goes.
_WATCHES: weakref.WeakSet[DDPWatch] = weakref.WeakSet()


def local_nonfinite(sharded_flag: Tensor | None = None) -> Tensor | None:
    """This rank's pre-reduction non-finite flag: a DTensor measurement's, or DDP watches'."""
    if sharded_flag is not None:
        return sharded_flag
    flags = [w.nonfinite for w in list(_WATCHES) if w.nonfinite is not None]
    if not flags:
        return None
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


def is_multi_rank() -> bool:
    """``True`` when a process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

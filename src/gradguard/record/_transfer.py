"""From buffered device scalars to a :class:`HostBatch`: one device→host copy per flush.

A step's device scalars are copied into a row of a preallocated device buffer with one
foreach copy (a snapshot: later in-place updates cannot change it); steps that do not
fit (mixed devices, a value that requires grad, more rows than the buffer holds) are
stacked into a tensor of their own. A buffered row is ``(step, host values, tensor
slots, buffer row index or own tensor, given mask)``; a snapshot is ``(step, per-tensor
norms, their names)``. At a flush, the rows and the scheduled snapshots travel in one
copy. The per-tensor norms of the other steps are kept (references, no copy) until then,
and those of steps whose total norm turns out non-finite follow in a second copy, made
only in intervals that had such a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..schema import STEP_COLUMNS, HostBatch

Row = tuple[int, list[float], tuple[int, ...], "int | Tensor | None", int]
Snapshot = tuple[int, Tensor, "tuple[str, ...] | None"]

_INDEX = {c: i for i, c in enumerate(STEP_COLUMNS)}
_NCOL = len(STEP_COLUMNS)
_TOTAL, _CLIPPED, _CLIP_COEF = _INDEX["total_norm"], _INDEX["clipped"], _INDEX["clip_coef"]
_NAN = float("nan")
_F32, _F64 = torch.float32, torch.float64


class RowBuffer:
    """Two ``(rows, columns)`` device buffers, used in turn, with their element views made once.

    ``put`` copies a step's scalars into the next row (``torch._foreach_copy_``: one
    kernel, casting as it copies) and returns its index; :meth:`take` hands the filled
    rows to a flush, which copies them to the host before the same buffer comes round
    again. About a third of the cost of stacking a step's mixed-dtype scalars.
    """

    MAX_ROWS = 512  # views are kept per element: bound their number

    def __init__(self, rows: int) -> None:
        self.rows = min(rows, self.MAX_ROWS)
        self._buffers: list[tuple[Tensor, tuple[Tensor, ...]]] = []
        self._current = 0
        self.count = 0  #: rows filled in the current buffer

    def put(self, tensors: list[Tensor], slots: list[int]) -> int | None:
        """Copy ``tensors`` into columns ``slots`` of the next row; ``None`` if they don't fit."""
        if self.count >= self.rows:
            return None
        device = tensors[0].device
        for t in tensors:
            if t.device != device or t.requires_grad:
                return None
        if not self._buffers:
            self._allocate(device)
        buffer, views = self._buffers[self._current]
        if buffer.device != device:
            if self.count:
                return None
            self._allocate(device)
            buffer, views = self._buffers[self._current]
        row = self.count
        base = row * _NCOL
        torch._foreach_copy_([views[base + i] for i in slots], tensors)
        self.count = row + 1
        return row

    def take(self) -> Tensor | None:
        """The filled rows; the next rows go to the other buffer."""
        if not self.count:
            return None
        block = self._buffers[self._current][0][: self.count]
        self._current = 1 - self._current
        self.count = 0
        return block

    def _allocate(self, device: torch.device) -> None:
        dtype = _F32 if device.type == "mps" else _F64  # float64 keeps a float64 loss exact
        self._buffers = []
        for _ in range(2):
            buffer = torch.full((self.rows, _NCOL), _NAN, dtype=dtype, device=device)
            self._buffers.append((buffer, buffer.view(-1).unbind()))
        self._current = 0


def stack(tensors: list[Tensor]) -> Tensor:
    """One device tensor holding a step's values (a copy: later in-place ops can't alter it).

    Same-dtype stacking is about twice as fast as letting ``stack`` promote mixed
    dtypes, so flags and codes are converted first (float64 when any value is, else
    float32).
    """
    device = tensors[0].device
    dtype = _F32
    grad = False
    for t in tensors:
        if t.device != device:
            return _stack_devices(tensors)
        if t.dtype is _F64:
            dtype = _F64
        grad = grad or t.requires_grad
    row = torch.stack([t if t.dtype is dtype else t.to(dtype) for t in tensors])
    return row.detach() if grad else row


def _stack_devices(tensors: list[Tensor]) -> Tensor:
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    dtype = _F64 if any(t.dtype is _F64 for t in tensors) else _F32
    row = torch.stack([t.to(device=device, dtype=dtype, non_blocking=True) for t in tensors])
    return row.detach()


class Transfer:
    """Copies device tensors to the host; on CUDA through a reused pinned buffer."""

    def __init__(self) -> None:
        self.count = 0  #: device→host copies made so far
        self._pinned: Tensor | None = None

    def __call__(self, parts: list[Tensor]) -> list[float]:
        """Concatenate ``parts`` on their device and copy to the host once."""
        device = parts[0].device
        if any(p.device != device for p in parts):
            parts = [p.to(device) for p in parts]
        flat = torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in parts]).detach()
        if flat.dtype is not _F32 and flat.dtype is not _F64:
            flat = flat.float()
        self.count += 1
        if device.type == "cuda":
            pinned = self._pinned
            if pinned is None or pinned.numel() < flat.numel() or pinned.dtype != flat.dtype:
                pinned = torch.empty(max(flat.numel(), 256), dtype=flat.dtype, pin_memory=True)
                self._pinned = pinned
            host = pinned[: flat.numel()]
            host.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            return host.tolist()
        return flat.cpu().tolist()


def to_host(
    rows: list[Row],
    block: Tensor | None,
    snaps: list[Snapshot],
    others: list[Snapshot],
    names: tuple[str, ...],
    transfer: Transfer,
) -> HostBatch:
    """The batch for ``rows`` (whose buffered values are in ``block``, see RowBuffer);
    ``snaps`` are scheduled snapshots, ``others`` the per-tensor norms of the remaining
    steps (snapshotted only where the total norm is non-finite)."""
    own = [r[3] for r in rows if isinstance(r[3], Tensor)]
    parts = ([block] if block is not None else []) + own + [s[1] for s in snaps]
    flat = transfer(parts) if parts else []
    columns = [[_NAN] * len(rows) for _ in range(_NCOL)]
    pos = block.numel() if block is not None else 0
    given = 0
    for j, (_, host, slots, row, mask) in enumerate(rows):
        given |= mask
        for i, v in enumerate(host):
            columns[i][j] = v
        if isinstance(row, int):
            base = row * _NCOL
            for i in slots:
                columns[i][j] = flat[base + i]
        elif row is not None:
            for i in slots:
                columns[i][j] = flat[pos]
                pos += 1
        if not mask >> _CLIPPED & 1:
            coef = columns[_CLIP_COEF][j]
            columns[_CLIPPED][j] = 1.0 if coef < 1.0 else 0.0
    given |= 1 << _CLIPPED
    snapshots: dict[int, list[float]] = {}
    for step, norms, tensor_names in snaps:
        n = norms.numel()
        snapshots[step] = align(flat[pos : pos + n], tensor_names, names)
        pos += n
    extra = _nonfinite_snapshots(rows, columns[_TOTAL], snapshots, others, names, transfer)
    snapshots.update(extra)
    absent = frozenset(c for i, c in enumerate(STEP_COLUMNS) if not given >> i & 1)
    ordered = sorted(snapshots)
    return HostBatch(
        steps=[r[0] for r in rows],
        columns={c: columns[i] for i, c in enumerate(STEP_COLUMNS)},
        names=names,
        tensor_steps=ordered,
        tensor_norms=[snapshots[s] for s in ordered],
        absent=absent,
        extra_tensor_steps=frozenset(extra),
    )


def _nonfinite_snapshots(
    rows: list[Row],
    totals: list[float],
    scheduled: dict[int, list[float]],
    others: list[Snapshot],
    names: tuple[str, ...],
    transfer: Transfer,
) -> dict[int, list[float]]:
    if not others:
        return {}
    bad = {r[0] for r, total in zip(rows, totals) if not math.isfinite(total)}
    wanted = [s for s in others if s[0] in bad and s[0] not in scheduled]
    if not wanted:
        return {}
    flat = transfer([s[1] for s in wanted])
    out, pos = {}, 0
    for step, norms, tensor_names in wanted:
        n = norms.numel()
        out[step] = align(flat[pos : pos + n], tensor_names, names)
        pos += n
    return out


def align(
    values: list[float], names: Sequence[str] | None, run_names: tuple[str, ...]
) -> list[float]:
    """Put snapshot values in the run's name order (NaN for names not measured)."""
    if names is None or tuple(names) == run_names:
        if len(values) == len(run_names) or not run_names:
            return values
        return (values + [_NAN] * len(run_names))[: len(run_names)]
    where = {n: i for i, n in enumerate(names)}
    return [values[where[n]] if n in where else _NAN for n in run_names]

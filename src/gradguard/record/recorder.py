"""The Recorder: buffers per-step device scalars and moves them to the host once per interval.

``record()`` on a non-log step only stacks the step's device scalars into one small
device tensor (a snapshot, so later in-place updates cannot change it) and appends it
to a buffer: no host sync, no I/O. Every ``log_every`` recorded steps the buffer (and any
per-tensor snapshots) is concatenated into one tensor and copied to the host in one
transfer, turned into a :class:`HostBatch`, shown to listeners (whose events are
recorded), and written to the run store and every sink. A sink that raises is disabled
with one warning; training goes on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _validate as check
from .._warn import Deferred
from ..schema import STEP_COLUMNS, Event, HostBatch, Sink
from ..stats import GradStats
from ._lifecycle import ExitHooks
from ._safe import Guarded
from ._writer import BackgroundWriter, InlineWriter
from .store import RunStore

Scalar = Tensor | float | int | bool
Listener = Callable[[HostBatch], Sequence[Event]]

_INDEX = {c: i for i, c in enumerate(STEP_COLUMNS)}
_NCOL = len(STEP_COLUMNS)
_CLIPPED, _CLIP_COEF = _INDEX["clipped"], _INDEX["clip_coef"]
_NAN = float("nan")


def _default_rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class Recorder:
    """Records guarded training steps to a run store and sinks, on rank 0 only by default.

    Args:
        store: a :class:`RunStore`, a run directory or ``.db`` path, ``None`` for
            ``runs/<timestamp>/gradguard.db``, or ``False`` for no store (sinks only).
        sinks: further sinks (TensorBoard, W&B, MLflow, console, or any :class:`Sink`).
        log_every: recorded steps per flush (one device→host transfer each).
        tensor_every: per-tensor snapshot interval in steps; defaults to ``log_every``.
        rank: this process's rank; only rank 0 records. Defaults to
            ``torch.distributed.get_rank()`` when initialised, else 0.
        config: run configuration stored in the run's meta.
        background: write (sinks, health listeners) on a background thread; ``False``
            writes inside ``flush`` on the caller's thread.

    Use as a context manager, or call :meth:`close`; a SIGTERM or interpreter exit
    flushes too.
    """

    def __init__(
        self,
        store: RunStore | str | os.PathLike[str] | bool | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        tensor_every: int | None = None,
        rank: int | None = None,
        config: dict | None = None,
        background: bool = True,
    ) -> None:
        self.log_every = check.positive_int("log_every", log_every)
        self.tensor_every = (
            self.log_every
            if tensor_every is None
            else check.positive_int("tensor_every", tensor_every)
        )
        self.rank = _default_rank() if rank is None else int(rank)
        self.active = self.rank == 0
        self.config: dict = dict(config or {})
        self.store: RunStore | None = None
        if self.active and store is not False:
            if isinstance(store, RunStore):
                self.store = store
            elif store is None or store is True:
                self.store = RunStore()
            else:
                self.store = RunStore(store)
        targets: list[Any] = ([self.store] if self.store is not None else []) + list(sinks)
        self._sinks = [Guarded(t) for t in targets]
        self._listeners: list[Guarded] = []
        self._names: tuple[str, ...] = ()
        self._shapes: list[tuple[int, ...]] | None = None
        self._started = False
        self._closed = False
        # buffer rows: (step, host values, tensor slots, stacked device values, given mask)
        self._rows: list[tuple[int, list[float], tuple[int, ...], Tensor | None, int]] = []
        self._snaps: list[tuple[int, Tensor, tuple[str, ...] | None]] = []
        self._events: list[Event] = []
        self._lock = threading.RLock()
        self._flushing = False
        self._pending_signal: int | None = None
        self._hooks: ExitHooks | None = None
        self._pinned: Tensor | None = None
        self.transfers = 0  #: device→host transfers made so far (one per flush with data)
        #: warnings decided on the writer thread, emitted at the next ``record()`` call
        self.deferred = Deferred()
        self._writer = BackgroundWriter(self._write) if background else InlineWriter(self._write)

    # ---------------------------------------------------------------- set-up
    def start(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]] | None = None,
        config: dict | None = None,
    ) -> None:
        """Declare parameter names (and shapes) and start the store and sinks; once per run."""
        if not self.active or self._started or self._closed:
            return
        self._started = True
        self._names = tuple(names)
        self._shapes = [tuple(int(d) for d in s) for s in shapes] if shapes is not None else None
        if config:
            self.config.update(config)
        run_config = {**self.config, "log_every": self.log_every, "tensor_every": self.tensor_every}
        for s in self._sinks:
            if isinstance(s.target, RunStore):
                s.call("start", self._names, run_config, self._shapes)
            else:
                s.call("start", self._names, run_config)
        self._hooks = ExitHooks(self._on_signal, self.close)

    def add_sink(self, sink: Sink) -> None:
        """Add a sink (started at once if the run already started)."""
        guarded = Guarded(sink)
        self._sinks.append(guarded)
        if self._started:
            guarded.call("start", self._names, dict(self.config))

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(batch)`` at every flush; the events it returns are recorded."""
        self._listeners.append(Guarded(fn))

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def wants_tensor_norms(self, step: int) -> bool:
        """``True`` at per-tensor snapshot steps (``step % tensor_every == 0``) on rank 0."""
        return self.active and not self._closed and step % self.tensor_every == 0

    # ---------------------------------------------------------------- hot path
    def record(
        self,
        step: int,
        *,
        total_norm: Scalar,
        clipped_norm: Scalar,
        clip_coef: Scalar,
        threshold: Scalar,
        skipped: Scalar,
        reason: Scalar,
        loss: Scalar | None = None,
        lr: float | None = None,
        loss_scale: Scalar | None = None,
        stats: GradStats | None = None,
        clipped: Scalar | None = None,
    ) -> HostBatch | None:
        """Buffer one step; at every ``log_every``-th call flush and return the batch.

        Values may be device tensors (0-d or one element) or Python numbers. ``clipped``
        defaults to ``clip_coef < 1``. ``stats`` is kept only at snapshot steps
        (:meth:`wants_tensor_norms`). No host sync happens except at a flush.
        """
        if not self.active or self._closed:
            return None
        self.deferred.emit()
        if not self._started:
            names = stats.labels() if stats is not None else ()
            self.start(names, [tuple(s) for s in stats.shapes] if stats is not None else None)
        values = (
            total_norm,
            clipped_norm,
            clip_coef,
            threshold,
            clipped,
            skipped,
            reason,
            loss,
            lr,
            loss_scale,
        )
        host = [_NAN] * _NCOL
        tensors: list[Tensor] = []
        slots: list[int] = []
        mask = 0
        for i, v in enumerate(values):
            if v is None:
                continue
            mask |= 1 << i
            if isinstance(v, Tensor):
                tensors.append(v if v.dim() == 0 else v.reshape(()))
                slots.append(i)
            else:
                host[i] = float(v)
        row = _stack(tensors) if tensors else None
        with self._lock:
            self._rows.append((int(step), host, tuple(slots), row, mask))
            if stats is not None and self.wants_tensor_norms(step):
                self._snaps.append((int(step), stats.norms.detach().reshape(-1), stats.names))
            full = len(self._rows) >= self.log_every
        return self.flush() if full else None

    def event(self, event: Event) -> None:
        """Record an event (written with the next flush)."""
        if self.active and not self._closed:
            with self._lock:
                self._events.append(event)

    # ---------------------------------------------------------------- flushing
    def flush(self) -> HostBatch | None:
        """Move buffered steps to the host in one transfer and hand them to the writer.

        The transfer happens here; listeners (health rules) and sinks run on the
        background writer thread, so slow I/O (a remote MLflow server, a busy disk)
        never stalls training. One batch is in the writer at a time: a flush waits for
        the previous batch to be written, so a crash loses at most the batch being
        written and the steps buffered since. Returns the batch, or ``None``.
        """
        if not self.active:
            return None
        with self._lock:
            rows, self._rows = self._rows, []
            snaps, self._snaps = self._snaps, []
            events, self._events = self._events, []
            if not rows and not snaps and not events:
                return None
            self._flushing = True
            try:
                batch = self._to_host(rows, snaps) if rows or snaps else None
                self._writer.submit(batch, events)
            finally:
                self._flushing = False
            pending, self._pending_signal = self._pending_signal, None
        if pending is not None:
            self._finish_signal(pending)
        return batch

    def drain(self) -> None:
        """Wait until everything flushed so far has been written by the writer thread."""
        self._writer.drain()

    def _write(self, batch: HostBatch | None, events: list[Event]) -> None:
        """Run listeners and sinks on one batch (on the writer thread)."""
        if batch is not None:
            for listener in self._listeners:
                found = listener.call("", batch)
                if found:
                    events.extend(found)
            for s in self._sinks:
                s.call("write", batch)
        if events:
            for s in self._sinks:
                s.call("write_events", events)

    def _to_host(
        self,
        rows: list[tuple[int, list[float], tuple[int, ...], Tensor | None, int]],
        snaps: list[tuple[int, Tensor, tuple[str, ...] | None]],
    ) -> HostBatch:
        parts = [r[3] for r in rows if r[3] is not None] + [s[1] for s in snaps]
        flat = self._transfer(parts) if parts else []
        columns = [[_NAN] * len(rows) for _ in range(_NCOL)]
        pos = 0
        given = 0
        for j, (_, host, slots, row, mask) in enumerate(rows):
            given |= mask
            for i, v in enumerate(host):
                columns[i][j] = v
            if row is not None:
                for i in slots:
                    columns[i][j] = flat[pos]
                    pos += 1
            if not mask >> _CLIPPED & 1:
                coef = columns[_CLIP_COEF][j]
                columns[_CLIPPED][j] = 1.0 if coef < 1.0 else 0.0
        given |= 1 << _CLIPPED
        tensor_steps, tensor_norms = [], []
        for step, norms, names in snaps:
            n = norms.numel()
            values = flat[pos : pos + n]
            pos += n
            tensor_steps.append(step)
            tensor_norms.append(self._align(values, names))
        absent = frozenset(c for i, c in enumerate(STEP_COLUMNS) if not given >> i & 1)
        return HostBatch(
            steps=[r[0] for r in rows],
            columns={c: columns[i] for i, c in enumerate(STEP_COLUMNS)},
            names=self._names,
            tensor_steps=tensor_steps,
            tensor_norms=tensor_norms,
            absent=absent,
        )

    def _align(self, values: list[float], names: tuple[str, ...] | None) -> list[float]:
        """Put snapshot values in the run's name order (NaN for names not measured)."""
        if names is None or names == self._names:
            if len(values) == len(self._names) or not self._names:
                return values
            return (values + [_NAN] * len(self._names))[: len(self._names)]
        where = {n: i for i, n in enumerate(names)}
        return [values[where[n]] if n in where else _NAN for n in self._names]

    def _transfer(self, parts: list[Tensor]) -> list[float]:
        """Concatenate ``parts`` on their device and copy to the host once."""
        device = parts[0].device
        flat = torch.cat([p.reshape(-1).to(device) for p in parts])
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        self.transfers += 1
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

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Flush, close every sink, and remove the exit hooks; safe to call twice."""
        if self._closed or not self.active:
            self._closed = True
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._writer.stop()
            for s in self._sinks:
                s.call("close")
            self.deferred.emit()
            if self._hooks is not None:
                self._hooks.remove()
                self._hooks = None

    def _on_signal(self, signum: int) -> bool:
        if self._flushing:  # finish the flush in progress first, then chain
            self._pending_signal = signum
            return False
        self.close()
        return True

    def _finish_signal(self, signum: int) -> None:
        hooks = self._hooks
        self.close()
        if hooks is not None:
            hooks.chain(signum)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Recorder(store={self.store!r}, sinks={len(self._sinks)}, "
            f"log_every={self.log_every}, rank={self.rank})"
        )


def _stack(tensors: list[Tensor]) -> Tensor:
    """One device tensor holding this step's values (a copy: later in-place ops can't alter it)."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
    if any(t.device != device for t in tensors):
        tensors = [t.to(device, non_blocking=True) for t in tensors]
    row = torch.stack(tensors)
    if row.dtype != torch.float64 and row.dtype != torch.float32:
        row = row.float()
    return row.detach()

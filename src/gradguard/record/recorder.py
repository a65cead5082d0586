"""The Recorder: buffers per-step device scalars and moves them to the host once per interval.

``record()`` on a non-log step only stacks the step's device scalars into one small
device tensor (a snapshot, so later in-place updates cannot change it) and appends it
to a buffer: no host sync, no I/O. Every ``log_every`` recorded steps the buffer (and any
per-tensor snapshots) is concatenated into one tensor and copied to the host in one
transfer, turned into a :class:`HostBatch`, shown to listeners (whose events are
recorded), and written to the run store and every sink. A sink that raises is disabled
with one warning; training goes on.

Given every step's ``GradStats``, the recorder keeps (a reference to) each step's
per-tensor norms until the flush, and snapshots them at every step whose total norm
was non-finite, besides the regular snapshots: the health rules need them to locate
where a NaN began. This costs no host sync; intervals with such a step pay one more
device→host copy.

Durability: the run store's transaction for an interval commits before the next
interval starts buffering, so a SIGKILL loses at most ``log_every`` steps (the
interval being written, or the steps buffered since the last flush).
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
from .._warn import warn as _warn
from ..schema import STEP_COLUMNS, Event, HostBatch, Sink
from ..stats import GradStats
from ._lifecycle import ExitHooks
from ._safe import Guarded
from ._transfer import Row, RowBuffer, Snapshot, Transfer, stack, to_host
from ._writer import BackgroundWriter, InlineWriter
from .store import RunStore

Scalar = Tensor | float | int | bool
Listener = Callable[[HostBatch], Sequence[Event]]

_NCOL = len(STEP_COLUMNS)
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
        resume: ``None`` records a new run into the store; a run id (see
            :meth:`RunStore.runs`) or ``"latest"`` continues that run, e.g. after
            loading a checkpoint (its rows from the first step recorded on are replaced).

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
        resume: int | str | None = None,
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
                if resume is not None:
                    self.store.resume = RunStore(store.path, resume=resume).resume
            elif store is None or store is True:
                self.store = RunStore(resume=resume)
            else:
                self.store = RunStore(store, resume=resume)
        #: warnings decided on the writer thread, emitted at the next ``record()`` call
        self.deferred = Deferred()
        self._writer = BackgroundWriter(self._write) if background else InlineWriter(self._write)
        self._store = self._guard(self.store) if self.store is not None else None
        self._sinks = [self._guard(s) for s in sinks]
        self._listeners: list[Guarded] = []
        self._names: tuple[str, ...] = ()
        self._shapes: list[tuple[int, ...]] | None = None
        self._started = False
        self._closed = False
        self._rows: list[Row] = []
        self._snaps: list[Snapshot] = []  # scheduled per-tensor snapshots
        self._others: list[Snapshot] = []  # other steps' norms, kept for non-finite steps
        self._events: list[Event] = []
        self._lock = threading.RLock()  # the buffers
        self._flush_lock = threading.RLock()  # one flush at a time, in order
        self._flushing = False
        self._pending_signal: int | None = None
        self._hooks: ExitHooks | None = None
        self._transfer = Transfer()
        self._buffer = RowBuffer(self.log_every)

    @property
    def transfers(self) -> int:
        """Device→host copies made so far (one per flush with data, two in intervals
        that had a non-finite step)."""
        return self._transfer.count

    @property
    def run(self) -> int | None:
        """The id of the run being recorded in the store (``None`` before it starts)."""
        return self.store.run if self.store is not None else None

    def _guard(self, target: Any) -> Guarded:
        return Guarded(target, warn=self._fault)

    def _fault(self, message: str) -> None:
        """A sink or listener failed: warn now, or at the next step if on the writer thread."""
        if self._writer.on_writer_thread():
            self.deferred.add(message)
        else:
            _warn(message)

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
        if self._store is not None:
            self._store.call("start", self._names, run_config, self._shapes)
        for s in self._sinks:
            s.call("start", self._names, run_config)
        self._hooks = ExitHooks(self._on_signal, self.close)

    def add_sink(self, sink: Sink) -> None:
        """Add a sink (started at once if the run already started)."""
        guarded = self._guard(sink)
        self._sinks.append(guarded)
        if self._started:
            guarded.call("start", self._names, dict(self.config))

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(batch)`` at every flush; the events it returns are recorded."""
        self._listeners.append(self._guard(fn))

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
        defaults to ``clip_coef < 1``. Pass ``stats`` at every step: its per-tensor norms
        are snapshotted at :meth:`wants_tensor_norms` steps and at steps whose total norm
        is non-finite (a reference is kept until the flush: don't modify ``stats.norms``
        in place). No host sync happens except at a flush.
        """
        if not self.active or self._closed:
            return None
        self.deferred.emit()
        if not self._rows:  # a new interval: the previous one must be on disk first
            self._writer.wait_durable()
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
        step = int(step)
        with self._lock:
            row: int | Tensor | None = None
            if tensors:
                row = self._buffer.put(tensors, slots)
                if row is None:
                    row = stack(tensors)
            self._rows.append((step, host, tuple(slots), row, mask))
            if stats is not None:
                kept = (step, stats.norms, stats.names)
                if step % self.tensor_every == 0:
                    self._snaps.append(kept)
                else:
                    self._others.append(kept)
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
        never stalls training. One batch is in the writer at a time, and the next
        interval starts only once its run-store transaction has committed, so a crash
        loses at most one interval. Returns the batch, or ``None``.
        """
        if not self.active:
            return None
        with self._flush_lock:  # flushes in order; record()/event() stay free meanwhile
            with self._lock:
                rows, self._rows = self._rows, []
                snaps, self._snaps = self._snaps, []
                others, self._others = self._others, []
                events, self._events = self._events, []
                block = self._buffer.take()
                if not rows and not snaps and not events:
                    return None
                self._flushing = True
            try:
                batch = (
                    to_host(rows, block, snaps, others, self._names, self._transfer)
                    if rows or snaps
                    else None
                )
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
        """Store, then listeners and sinks, for one batch (on the writer thread).

        The run store commits the batch with the events recorded during the interval
        first, and only that is waited for (see :meth:`record`); the health listeners'
        events follow in a second transaction.
        """
        store = self._store
        try:
            if store is not None:
                if batch is not None:
                    store.call("write", batch, events)
                elif events:
                    store.call("write_events", events)
        finally:
            self._writer.mark_durable()
        found: list[Event] = []
        if batch is not None:
            for listener in self._listeners:
                more = listener.call("", batch)
                if more:
                    found.extend(more)
            for s in self._sinks:
                s.call("write", batch)
        if events or found:
            for s in self._sinks:
                s.call("write_events", [*events, *found])
        if found and store is not None:
            store.call("write_events", found)

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
            for s in [*self._sinks, *([self._store] if self._store is not None else [])]:
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

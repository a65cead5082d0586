"""Skipped steps, named: one :func:`~gradguard.schema.skip_event` per skip, on every path.

A skip the host knows at once (host math on the CPU, or the one sync of a plain optimizer)
is reported at once. A skip decided on the device (folded into a fused optimizer, or a
step handed to :meth:`~gradguard.Guard.process`) is held until ``log_every`` such steps
are pending, then all their flags are read in one transfer and the skipped ones reported:
the event is the same, only later. Every rank of a distributed run resolves at the same
step, so naming the ranks whose gradients were non-finite (a collective) is safe there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import _warn, distributed
from .schema import skip_event

if TYPE_CHECKING:
    from .guard import Guard
    from .result import StepResult


class SkipReports:
    """The skip events of one guard: reported now, or pending until resolved."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.pending: list[StepResult] = []
        self.warned = False

    def after_step(self, result: StepResult) -> None:
        """Report ``result``'s skip if the host knows of it, else hold it."""
        known = result.skipped_on_host
        if known:
            self.report(result)
        elif known is None:
            self.pending.append(result)
            if len(self.pending) >= self.guard.log_every:
                self.resolve(collective=True)

    def resolve(self, collective: bool) -> None:
        """Read the pending skip flags in one transfer and report the skipped steps."""
        pending, self.pending = self.pending, []
        unknown = [r for r in pending if r.skipped_on_host is None]
        if unknown:
            flags = torch.stack([r.skipped.reshape(()) for r in unknown]).tolist()
            for result, flag in zip(unknown, flags):
                result.skipped_on_host = bool(flag)
        for result in pending:
            if result.skipped_on_host and not result.reported:
                self.report(result, collective)

    def report(self, result: StepResult, collective: bool = True) -> None:
        """Record the skip event of ``result`` and warn on the guard's first skip. Syncs."""
        result.reported = True
        guard = self.guard
        reason = result.reason_label
        # An AMP overflow is non-finite gradients too (after a scale too large): name them.
        names = result.nonfinite_names() if reason in ("nonfinite", "amp_overflow") else []
        origin = guard.nonfinite_origin(result) if names else None
        ranks = _nonfinite_ranks(result) if names and collective else None
        event = skip_event(result.step, reason, names, origin, ranks)
        if guard.recorder is not None:
            guard.recorder.event(event)
        if not self.warned:
            self.warned = True
            _warn.warn(event.message)


def _nonfinite_ranks(result: StepResult) -> list[int] | None:
    """Ranks whose local gradients were non-finite (collective; on non-finite skips only)."""
    if not distributed.is_multi_rank():
        return None
    flag = distributed.local_nonfinite(result.stats.local_nonfinite)
    return None if flag is None else distributed.nonfinite_ranks(flag)

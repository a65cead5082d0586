"""Run the health rules at every recorder flush: findings become events and warnings."""

from __future__ import annotations

from typing import Any

from ..schema import Event, HostBatch
from .config import HealthConfig
from .monitor import HealthMonitor, OrderLike


def attach_health(
    recorder: Any, config: HealthConfig | None = None, order: OrderLike | None = None
) -> HealthMonitor:
    """Evaluate the rules on each flushed batch of ``recorder``.

    Each finding is recorded as an event when it starts, and warns once unless it is
    only informational; the warning surfaces at the user's next ``guard.step`` line
    (the rules run on the recorder's writer thread). Returns the monitor, whose state
    is bounded (see HealthMonitor).
    """
    monitor = HealthMonitor(config or HealthConfig(), order=order)

    def listen(batch: HostBatch) -> list[Event]:
        findings = monitor.update(batch)
        for finding in findings:
            if str(finding.severity) == "info" or _told_by_skip(finding, batch):
                continue
            recorder.deferred.add(finding.message)
        return [finding.to_event() for finding in findings]

    recorder.add_listener(listen)
    return monitor


def _told_by_skip(finding: Any, batch: HostBatch) -> bool:
    """A non-finite finding whose steps in ``batch`` were all skipped: the skip warned."""
    if getattr(finding.kind, "value", finding.kind) != "nonfinite":
        return False
    first, last = finding.steps
    flags = [f for s, f in zip(batch.steps, batch.columns["skipped"]) if first <= s <= last]
    return bool(flags) and all(f == 1.0 for f in flags)

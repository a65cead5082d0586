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
            if str(finding.severity) != "info":
                recorder.deferred.add(finding.message)
        return [finding.to_event() for finding in findings]

    recorder.add_listener(listen)
    return monitor

"""Run the health rules at every recorder flush: findings become events and warnings."""

from __future__ import annotations

import warnings
from typing import Any

from ..schema import Event, HostBatch
from .config import HealthConfig
from .monitor import HealthMonitor, OrderLike


def attach_health(
    recorder: Any, config: HealthConfig | None = None, order: OrderLike | None = None
) -> HealthMonitor:
    """Evaluate the rules on each flushed batch of ``recorder``.

    Each finding is recorded as an event when it starts, and warns once unless it is
    only informational. Returns the monitor (its state is bounded; see HealthMonitor).
    """
    monitor = HealthMonitor(config or HealthConfig(), order=order)

    def listen(batch: HostBatch) -> list[Event]:
        findings = monitor.update(batch)
        for finding in findings:
            if str(finding.severity) != "info":
                warnings.warn(f"gradguard: {finding.message}", RuntimeWarning, stacklevel=2)
        return [finding.to_event() for finding in findings]

    recorder.add_listener(listen)
    return monitor

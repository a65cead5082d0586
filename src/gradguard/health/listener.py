"""Run the health rules at every recorder flush: findings become events and warnings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..schema import Event, EventKind, HostBatch
from .config import HealthConfig
from .monitor import HealthMonitor, OrderLike


class _SkipTap:
    """A sink that shows the recorded skip events (which name the non-finite parameters
    and their backward-order origin) to the monitor; it writes nothing."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    def start(self, names: Sequence[str], config: dict) -> None:
        pass

    def write(self, batch: HostBatch) -> None:
        pass

    def write_events(self, events: Sequence[Event]) -> None:
        skips = [e for e in events if e.kind == EventKind.SKIP]
        if skips:
            self.monitor.note_events(skips)

    def close(self) -> None:
        pass


def attach_health(
    recorder: Any, config: HealthConfig | None = None, order: OrderLike | None = None
) -> HealthMonitor:
    """Evaluate the rules on each flushed batch of ``recorder``.

    Each finding is recorded as an event keyed by its episode (an update replaces the
    previous state in the run store), and warns once per episode when it first reaches
    warning severity; the warning surfaces at the user's next ``guard.step`` line (the
    rules run on the recorder's writer thread) and on the ``gradguard`` logger. The
    model family goes into the run's config, so replays use the same thresholds.
    Returns the monitor, whose state is bounded (see HealthMonitor).
    """
    config = config or HealthConfig()
    monitor = HealthMonitor(config, order=order)
    if isinstance(getattr(recorder, "config", None), dict):
        recorder.config.setdefault("family", config.family)

    first_skip: list[int] = []  # the run's first skipped step: the guard warned there

    def listen(batch: HostBatch) -> list[Event]:
        if not first_skip:
            skipped = [s for s, f in zip(batch.steps, batch.columns["skipped"]) if f == 1.0]
            first_skip[:] = skipped[:1]
        findings = monitor.update(batch)
        for finding in monitor.to_warn:
            if first_skip and _told_by_skip(finding, batch, first_skip[0]):
                continue  # the guard's skip warning told this incident already
            recorder.deferred.add(finding.message)
        return [finding.to_event() for finding in findings]

    recorder.add_listener(listen)
    recorder.add_sink(_SkipTap(monitor))
    return monitor


def _told_by_skip(finding: Any, batch: HostBatch, first_skip: int) -> bool:
    """A non-finite finding that starts at the run's first skip (the one the guard warns
    about, naming the origin) and whose steps in ``batch`` were all skipped."""
    if getattr(finding.kind, "value", finding.kind) != "nonfinite":
        return False
    first, last = finding.steps
    if first != first_skip:
        return False
    flags = [f for s, f in zip(batch.steps, batch.columns["skipped"]) if first <= s <= last]
    return bool(flags) and all(f == 1.0 for f in flags)

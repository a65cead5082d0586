"""Episodes for sinks that cannot update what they logged (TensorBoard text, W&B, MLflow, console).

An episode (an event with a ``key``) is sent again each time it is extended; such a
sink writes it once when it opens and once when it closes. A point event is written
once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ...schema import Event

POINT, OPENED, CLOSED = "event", "opened", "closed"


class EpisodeLog:
    """Picks, from each write's events, those a write-once sink should log, with their phase."""

    def __init__(self) -> None:
        self._open: set[str] = set()
        self._closed: set[str] = set()

    def select(self, events: Sequence[Event]) -> Iterator[tuple[Event, str]]:
        """``(event, phase)`` for point events, openings and closings; extensions are dropped."""
        for e in events:
            key = e.key
            if key is None:
                yield e, POINT
            elif e.ongoing:
                if key not in self._open and key not in self._closed:
                    self._open.add(key)
                    yield e, OPENED
            elif key not in self._closed:
                self._open.discard(key)
                self._closed.add(key)
                yield e, CLOSED


def step_of(event: Event, phase: str) -> int:
    """The step to log at: where it opened, or where it closed."""
    if phase == CLOSED and event.end_step is not None:
        return event.end_step
    return event.step


def describe(event: Event, phase: str) -> str:
    """One line: the message, with the episode's phase and range."""
    if phase == OPENED:
        return f"opened at step {event.step}: {event.message}"
    if phase == CLOSED:
        end = event.end_step if event.end_step is not None else event.step
        return f"closed (steps {event.step}-{end}): {event.message}"
    return event.message

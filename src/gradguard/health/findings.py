"""What a health rule reports: a :class:`Finding` and its :class:`Severity`.

The finding kinds (:class:`~gradguard.health.rules.Kind`) are those of the rule list.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..schema import Event, EventKind

if TYPE_CHECKING:
    from .rules import Kind

#: Prefix of :attr:`Event.kind` for events made from findings (``"health.exploding"``).
EVENT_PREFIX = EventKind.FINDING_PREFIX


class Severity(str, enum.Enum):
    """How bad it is; compare with :attr:`rank`."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return ("info", "warning", "critical").index(self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: what, when, where, the numbers behind it, and what to do.

    Attributes:
        kind: what went wrong.
        severity: ``info``, ``warning`` or ``critical``.
        steps: ``(first, last)`` step of the evidence window.
        params: parameter or layer names involved (the origin first, where one is known).
        evidence: the numbers the rule decided on.
        advice: concrete actions, most useful first.
        message: one-line human summary.
    """

    kind: Kind
    severity: Severity
    steps: tuple[int, int]
    params: tuple[str, ...] = ()
    evidence: dict[str, float] = field(default_factory=dict)
    advice: tuple[str, ...] = ()
    message: str = ""

    def __str__(self) -> str:
        where = f" [{', '.join(self.params[:3])}{', …' if len(self.params) > 3 else ''}]"
        return f"{self.severity.value.upper()} {self.kind.value} @ step {self.steps[0]}: " + (
            self.message + (where if self.params else "")
        )

    def to_event(self) -> Event:
        """This finding as a run-store :class:`Event` (kind ``"health.<kind>"``)."""
        data = {
            "severity": self.severity.value,
            "steps": list(self.steps),
            "params": list(self.params),
            "evidence": dict(self.evidence),
            "advice": list(self.advice),
        }
        return Event(self.steps[0], EVENT_PREFIX + self.kind.value, self.message, data)

    @classmethod
    def from_event(cls, event: Event) -> Finding:
        """Rebuild a finding from :meth:`to_event`'s output (e.g. read back from a store)."""
        if not event.kind.startswith(EVENT_PREFIX):
            raise ValueError(f"event.kind must start with {EVENT_PREFIX!r}, got {event.kind!r}")
        from .rules import Kind

        data: Mapping = event.data
        steps = data.get("steps", (event.step, event.step))
        return cls(
            kind=Kind(event.kind[len(EVENT_PREFIX) :]),
            severity=Severity(data.get("severity", "info")),
            steps=(int(steps[0]), int(steps[1])),
            params=tuple(data.get("params", ())),
            evidence=dict(data.get("evidence", {})),
            advice=tuple(data.get("advice", ())),
            message=event.message,
        )

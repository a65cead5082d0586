"""What a health rule reports: a :class:`Finding` and its :class:`Severity`.

The finding kinds (:class:`~gradguard.health.rules.Kind`) are those of the rule list.
A finding describes an episode: ``steps`` is its true range so far, ``open`` says
whether it may still grow, and ``key`` identifies it within the run, so the run store
replaces a finding's earlier state with each update.
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

#: :attr:`Finding.origin` when the forward pass, the loss or the input batch produced a
#: non-finite value (rather than one parameter's backward).
FORWARD = "forward"
#: :attr:`Finding.origin` when a NaN was born in backward but no per-tensor norms locate it.
BACKWARD = "backward"


def layer_label(name: str) -> str:
    """A layer's name as a message shows it: ``layer 3`` for a bare ``nn.Sequential`` index
    (a lone number reads as a quantity), the module path otherwise."""
    return f"layer {name}" if name.isdigit() else name


def reading_order(finding: Finding) -> tuple[int, int, str, int]:
    """Sort key of findings as they are shown: by first step, the worst first, then by
    kind, so that the order never depends on which flush reported a finding first."""
    return (finding.steps[0], -finding.severity.rank, finding.kind.value, finding.steps[1])


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
        steps: ``(first, last)`` step of the episode so far.
        params: parameter or layer names involved (the origin first, where one is known).
        evidence: the numbers the rule decided on.
        advice: concrete actions, most useful first.
        message: one-line human summary.
        key: identifies the episode within its run (``None`` for a one-off finding).
        open: the episode may still be extended (it had not ended when reported).
        origin: where it started: a parameter name, :data:`FORWARD` (the forward pass,
            the loss or the input batch) or :data:`BACKWARD` (born in backward, not
            located); ``None`` when the rule does not locate.
    """

    kind: Kind
    severity: Severity
    steps: tuple[int, int]
    params: tuple[str, ...] = ()
    evidence: dict[str, float] = field(default_factory=dict)
    advice: tuple[str, ...] = ()
    message: str = ""
    key: str | None = None
    open: bool = False
    origin: str | None = None

    def __str__(self) -> str:
        where = f" [{', '.join(self.params[:3])}{', …' if len(self.params) > 3 else ''}]"
        first, last = self.steps
        span = f"step {first}" if first == last else f"steps {first}–{last}"
        return f"{self.severity.value.upper()} {self.kind.value} @ {span}: " + (
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
            "origin": self.origin,
        }
        return Event(
            self.steps[0],
            EVENT_PREFIX + self.kind.value,
            self.message,
            data,
            end_step=self.steps[1],
            key=self.key,
            ongoing=self.open,
        )

    @classmethod
    def from_event(cls, event: Event) -> Finding:
        """Rebuild a finding from :meth:`to_event`'s output (e.g. read back from a store)."""
        from .rules import Kind

        if not event.kind.startswith(EVENT_PREFIX):
            raise ValueError(f"event.kind must start with {EVENT_PREFIX!r}, got {event.kind!r}")
        data: Mapping = event.data
        steps = data.get("steps", (event.step, event.step))
        first = int(steps[0])
        last = (
            int(event.end_step) if getattr(event, "end_step", None) is not None else int(steps[1])
        )
        origin = data.get("origin")
        return cls(
            kind=Kind(event.kind[len(EVENT_PREFIX) :]),
            severity=Severity(data.get("severity", "info")),
            steps=(first, max(first, last)),
            params=tuple(data.get("params", ())),
            evidence=dict(data.get("evidence", {})),
            advice=tuple(data.get("advice", ())),
            message=event.message,
            key=getattr(event, "key", None),
            open=bool(getattr(event, "ongoing", False)),
            origin=origin if isinstance(origin, str) else None,
        )

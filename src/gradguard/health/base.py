"""Base classes of the health rules: thresholds, step rows, shared signals, the :class:`Rule`.

A rule is one class in one file: its finding kind, severity and scope, the condition
in words, the advice, the thresholds it declares (name, default, check, meaning), and
the detector (``on_step`` for per-step rows, ``on_snapshot`` for per-layer snapshots).
Measurements several rules read (the rolling norm baseline, clip activity, the layer
view) are :class:`Signal` objects shared through the :class:`Context`, computed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..schema import SkipReason
from .findings import Finding, Severity
from .windows import Latch, Run

if TYPE_CHECKING:
    from .config import HealthConfig
    from .signals import LayerSnapshot

NAN = float("nan")


@dataclass(frozen=True)
class Threshold:
    """One threshold a rule or signal reads from :class:`~gradguard.health.HealthConfig`.

    Attributes:
        name: the configuration field (``HealthConfig(name=...)``, ``config.name``).
        default: its value unless overridden; ``None`` with ``family`` set means the
            model family's value.
        check: ``check(name, value) -> value``: validates and normalises, raising an
            error that names the field.
        doc: what it means, in one sentence.
        family: the :class:`~gradguard.health.families.Family` attribute that supplies
            the default when ``default`` is ``None``.
    """

    name: str
    default: Any
    check: Callable[[str, object], Any]
    doc: str
    family: str | None = None


@dataclass(frozen=True, slots=True)
class StepRow:
    """One recorded step as host numbers (NaN where a column was not recorded)."""

    step: int
    norm: float
    threshold: float = math.inf
    clipped: float = NAN
    skipped: bool = False
    reason: int = 0
    loss: float = NAN
    lr: float = NAN
    loss_scale: float = NAN
    clip_coef: float = NAN
    names: tuple[str, ...] = ()
    tensor_norms: Sequence[float] | None = None  #: the per-tensor snapshot at this step, if any

    @property
    def amp_overflow(self) -> bool:
        """The GradScaler skipped this step for inf/NaN (its norm is of scaled gradients)."""
        return self.skipped and self.reason == SkipReason.AMP_OVERFLOW

    @property
    def finite(self) -> bool:
        return math.isfinite(self.norm)


class Signal:
    """A measurement shared by several rules, updated once per finite, non-AMP step.

    ``before_step`` runs before the rules see the row (so they read values that include
    it), ``after_step`` after them (so they can compare the row with the past).
    """

    thresholds: ClassVar[tuple[Threshold, ...]] = ()

    def __init__(self, config: HealthConfig) -> None:
        self.config = config

    @classmethod
    def check_config(cls, values: Mapping[str, Any]) -> None:
        """Checks across thresholds (each value alone is checked by its Threshold)."""

    def before_step(self, row: StepRow) -> None:
        """Update with ``row`` before the rules read it."""

    def after_step(self, row: StepRow) -> None:
        """Update with ``row`` after the rules read it."""


S = TypeVar("S", bound=Signal)


class Context:
    """What rules share: the configuration, the backward order, the signals."""

    def __init__(self, config: HealthConfig, order: Any = None) -> None:
        self.config = config
        self.order = order
        self._signals: dict[type[Signal], Signal] = {}

    def signal(self, kind: type[S]) -> S:
        """The monitor's one instance of signal class ``kind`` (created on first use)."""
        found = self._signals.get(kind)
        if found is None:
            found = self._signals[kind] = kind(self.config)
        return found  # type: ignore[return-value]

    @property
    def signals(self) -> tuple[Signal, ...]:
        return tuple(self._signals.values())


class Rule:
    """One health rule. Subclasses set the class attributes and override the detectors.

    Class attributes:
        kind: the finding kind it reports (a stable string, stored in run stores).
        severity: severity of its findings.
        scope: ``"step"`` (per-step columns), ``"window"`` (a rolling window of steps)
            or ``"layer"`` (per-tensor snapshots).
        reads: the step rows it sees: ``"finite"`` (finite norm, not an AMP overflow),
            ``"nonamp"`` (every row but AMP overflows) or ``"all"``.
        condition: the trigger in words, naming the thresholds it reads.
        advice: concrete actions, most useful first; may use ``{family}``,
            ``{clip_low}`` and ``{clip_high}``.
        thresholds: the thresholds this rule declares.
    """

    kind: ClassVar[str]
    severity: ClassVar[Severity]
    scope: ClassVar[str]
    reads: ClassVar[str] = "finite"
    condition: ClassVar[str]
    advice: ClassVar[tuple[str, ...]]
    thresholds: ClassVar[tuple[Threshold, ...]] = ()

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config
        self._found: list[Finding] = []
        self._latches: dict[object, Latch] = {}
        self._runs: dict[object, Run] = {}

    @classmethod
    def check_config(cls, values: Mapping[str, Any]) -> None:
        """Checks across thresholds (each value alone is checked by its Threshold)."""

    def on_step(self, row: StepRow) -> None:
        """Observe one step row (only the rows :attr:`reads` selects)."""

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        """Observe one per-layer snapshot of finite norms."""

    # ------------------------------------------------------------ helpers for subclasses

    def fire(self, key: object, active: bool, rearm: int) -> bool:
        """``True`` when ``active`` starts (latched until clear for ``rearm`` observations)."""
        latch = self._latches.get(key)
        if latch is None:
            latch = self._latches[key] = Latch()
        return latch.update(active, rearm)

    def run(self, key: object = None) -> Run:
        """The run of consecutive hits kept under ``key``."""
        found = self._runs.get(key)
        if found is None:
            found = self._runs[key] = Run()
        return found

    def report(
        self,
        steps: tuple[int, int],
        message: str,
        evidence: Mapping[str, float],
        params: tuple[str, ...] = (),
        extra_advice: tuple[str, ...] = (),
    ) -> Finding:
        """Record a finding of this rule's kind, severity and advice; returns it."""
        finding = make_finding(self, self.config, steps, message, evidence, params, extra_advice)
        self._found.append(finding)
        return finding

    def take(self) -> list[Finding]:
        """The findings reported since the last call."""
        found, self._found = self._found, []
        return found


def make_finding(
    rule: type[Rule] | Rule,
    config: HealthConfig,
    steps: tuple[int, int],
    message: str,
    evidence: Mapping[str, float],
    params: tuple[str, ...] = (),
    extra_advice: tuple[str, ...] = (),
) -> Finding:
    """A finding of ``rule``'s kind with its severity and advice filled for the family."""
    from .rules import Kind

    row = config.family_row
    fill = {
        "family": row.name,
        "clip_low": f"{row.clip_range[0]:g}",
        "clip_high": f"{row.clip_range[1]:g}",
    }
    advice = tuple(text.format(**fill) for text in rule.advice) + extra_advice
    return Finding(
        kind=Kind(rule.kind),
        severity=rule.severity,
        steps=(int(steps[0]), int(steps[1])),
        params=params,
        evidence={k: float(v) for k, v in evidence.items()},
        advice=advice,
        message=message,
    )

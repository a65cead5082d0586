"""Base classes of the health rules: thresholds, batches of steps, shared signals, :class:`Rule`.

A rule is one class in one file (``rules/*.py``): its finding kind, severity and scope,
the condition in words, the advice, the thresholds it declares (name, default, check,
meaning), and its detector: ``on_steps`` over a batch of step rows (numpy arrays) or
``on_snapshot`` over one per-layer snapshot. Measurements several rules read (the
rolling norm baseline, the loss trend, clip activity) are :class:`Signal` objects shared
through the :class:`Context` and computed once per batch. Rules report episodes
(:mod:`.episodes`): each report carries the episode's true range and key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from ..schema import SkipReason
from .episodes import Change, Episode, Tracker
from .findings import Finding, Severity
from .windows import Streaks

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


@dataclass(frozen=True)
class Steps:
    """A batch of recorded steps as numpy arrays (NaN where a column was not recorded).

    ``snapshots`` maps steps of this batch to their per-tensor norms (aligned with
    ``names``); ``loss_given`` says whether the loss column was recorded at all.
    """

    step: np.ndarray
    norm: np.ndarray
    threshold: np.ndarray
    clipped: np.ndarray
    skipped: np.ndarray
    reason: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    loss_scale: np.ndarray
    names: tuple[str, ...] = ()
    snapshots: Mapping[int, np.ndarray] = field(default_factory=dict)
    loss_given: bool = True

    def __len__(self) -> int:
        return len(self.step)

    @property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.norm)

    @property
    def amp_overflow(self) -> np.ndarray:
        """The GradScaler skipped these steps for inf/NaN (their norm is of scaled grads)."""
        return self.skipped & (self.reason == int(SkipReason.AMP_OVERFLOW))

    def take(self, mask: np.ndarray) -> Steps:
        """The rows where ``mask`` holds (these steps themselves when it holds everywhere)."""
        if mask.all():
            return self
        pick = {
            name: getattr(self, name)[mask]
            for name in (
                "step",
                "norm",
                "threshold",
                "clipped",
                "skipped",
                "reason",
                "loss",
                "lr",
                "loss_scale",
            )
        }
        return Steps(**pick, names=self.names, snapshots=self.snapshots, loss_given=self.loss_given)


class Signal:
    """A measurement shared by several rules, computed once per batch.

    ``update`` sees every step row except AMP overflows (the rows step rules see) and
    fills per-row arrays aligned with them; non-finite values never enter its windows.
    """

    thresholds: ClassVar[tuple[Threshold, ...]] = ()

    def __init__(self, config: HealthConfig) -> None:
        self.config = config

    @classmethod
    def check_config(cls, values: Mapping[str, Any]) -> None:
        """Checks across thresholds (each value alone is checked by its Threshold)."""

    def update(self, steps: Steps) -> None:
        """Compute this batch's per-row values."""


S = TypeVar("S", bound=Signal)


class Context:
    """What rules share: the configuration, the backward order, the signals, late evidence."""

    def __init__(self, config: HealthConfig, order: Any = None) -> None:
        self.config = config
        self.order = order
        self.first_step = 0  #: the first step the monitor saw
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
        severity: severity of its findings (a report may raise or lower it).
        scope: ``"step"`` (per-step columns), ``"window"`` (a rolling window of steps),
            ``"run"`` (the run as a whole) or ``"layer"`` (per-tensor snapshots).
        amp_rows: ``True`` to also see the steps the GradScaler skipped for overflow.
        condition: the trigger in words, naming the thresholds it reads.
        advice: concrete actions, most useful first; may use ``{family}``,
            ``{clip_low}`` and ``{clip_high}``.
        thresholds: the thresholds this rule declares.
    """

    kind: ClassVar[str]
    severity: ClassVar[Severity]
    scope: ClassVar[str]
    amp_rows: ClassVar[bool] = False
    condition: ClassVar[str]
    advice: ClassVar[tuple[str, ...]]
    thresholds: ClassVar[tuple[Threshold, ...]] = ()

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = context.config
        self._found: dict[str, Finding] = {}
        self._opened: list[str] = []
        self._warn: list[Finding] = []

    @classmethod
    def check_config(cls, values: Mapping[str, Any]) -> None:
        """Checks across thresholds (each value alone is checked by its Threshold)."""

    def on_steps(self, steps: Steps) -> None:
        """Observe a batch of step rows (every row but AMP overflows, unless ``amp_rows``)."""

    def on_snapshot(self, snapshot: LayerSnapshot) -> None:
        """Observe one per-layer snapshot of finite norms."""

    def on_events(self, events: list[Any]) -> None:
        """Observe recorded events (e.g. skips naming non-finite parameters)."""

    # ------------------------------------------------------------ helpers for subclasses

    def updated(self, changes: list[Change]) -> Iterator[Change]:
        """The changes that brought new rows; an episode closed by clear rows alone is
        reported again, closed, with its last message and numbers."""
        for change in changes:
            if change.hi >= change.lo:
                yield change
            elif "last_report" in change.episode.stats:
                message, evidence, params, kwargs = change.episode.stats["last_report"]
                self.report(change.episode, message, evidence, params, **kwargs)

    def report(
        self,
        episode: Episode,
        message: str,
        evidence: Mapping[str, float],
        params: tuple[str, ...] = (),
        *,
        origin: str | None = None,
        severity: Severity | None = None,
        extra_advice: tuple[str, ...] = (),
    ) -> Finding:
        """Report ``episode``'s current state (a later report of it replaces this one)."""
        kwargs = {"origin": origin, "severity": severity, "extra_advice": extra_advice}
        episode.stats["last_report"] = (message, dict(evidence), params, kwargs)
        finding = make_finding(
            self,
            self.config,
            (episode.first, episode.last),
            message,
            evidence,
            params,
            extra_advice,
            key=episode.key,
            open=episode.open,
            origin=origin,
            severity=severity,
        )
        self._found[episode.key] = finding
        if not episode.reported:
            episode.reported = True
            self._opened.append(episode.key)
        if finding.severity.rank >= Severity.WARNING.rank and not episode.stats.get("warned"):
            episode.stats["warned"] = True
            self._warn.append(finding)
        return finding

    def take(self) -> tuple[list[Finding], list[str], list[Finding]]:
        """Since the last call: the findings reported, the keys reported for the first time,
        and the findings that reached warning severity for the first time."""
        found, opened, warn = list(self._found.values()), self._opened, self._warn
        self._found, self._opened, self._warn = {}, [], []
        return found, opened, warn


def make_finding(
    rule: type[Rule] | Rule,
    config: HealthConfig,
    steps: tuple[int, int],
    message: str,
    evidence: Mapping[str, float],
    params: tuple[str, ...] = (),
    extra_advice: tuple[str, ...] = (),
    *,
    key: str | None = None,
    open: bool = False,
    origin: str | None = None,
    severity: Severity | None = None,
) -> Finding:
    """A finding of ``rule``'s kind with its severity and advice filled for the family."""
    from .rules import Kind

    row = config.family_row
    fill = {
        "family": row.label,
        "clip_low": f"{row.clip_range[0]:g}",
        "clip_high": f"{row.clip_range[1]:g}",
    }
    # advice for this finding's situation first: a reader (and the CLI, which prints three)
    # sees what fits the case before the rule's general remedies
    advice = extra_advice + tuple(text.format(**fill) for text in rule.advice)
    return Finding(
        kind=Kind(rule.kind),
        severity=severity or rule.severity,
        steps=(int(steps[0]), int(steps[1])),
        params=params,
        evidence={k: float(v) for k, v in evidence.items()},
        advice=advice,
        message=message,
        key=key,
        open=open,
        origin=origin,
    )


class LayerRule(Rule):
    """A rule over per-layer snapshots: one episode at a time, while any layer (or pair)
    has held its condition for `tensor_sustain` snapshots in a row."""

    scope = "layer"

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.streaks = Streaks()
        self.tracker = Tracker(self.kind, 1, self.config.rearm_snapshots)

    def held(self, step: int, names: tuple[Any, ...], hits: np.ndarray) -> dict[Any, int]:
        """The names (``hits`` is aligned with them) whose condition has held
        `tensor_sustain` snapshots, with its first step."""
        length, first = self.streaks.update(step, names, hits)
        rows = np.flatnonzero(length >= self.config.tensor_sustain)
        return {names[i]: f for i, f in zip(rows.tolist(), first[rows].tolist())}

    def observe(self, step: int, active: bool, start: int) -> Iterator[Change]:
        """Feed one snapshot's verdict to the episode tracker; the changes it made."""
        return self.updated(self.tracker.feed([step], [active], [start])[0])

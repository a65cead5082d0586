"""The health rules run over recorded host numbers, online or as a replay.

:class:`HealthMonitor` dispatches each flushed :class:`~gradguard.schema.HostBatch` to
the rule objects of :data:`~gradguard.health.rules.RULES`: the step rows, as numpy
arrays, to the step rules; each finite per-tensor snapshot to the layer rules. It
returns the findings whose episodes opened, grew or closed in that batch. Every rule
and signal keeps bounded state (fixed-size windows, counters, the open episodes), so an
update costs time proportional to the batch, not to the run. :func:`diagnose` replays a
whole recorded run through a monitor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..layers import group_index
from ..schema import Event, HostBatch
from .base import Context, Rule, Steps
from .config import HealthConfig
from .findings import Finding, reading_order
from .rules import RULES, Kind
from .signals import LayerSnapshot

_COLUMNS = ("norm", "threshold", "clipped", "skipped", "reason", "loss", "lr", "loss_scale")
_SOURCES = {"norm": "total_norm"}


class OrderLike(Protocol):
    """Anything that names the first non-finite parameter in backward order.

    It may also offer ``unreached()``: the parameters that require grad but got no
    gradient in the backward pass it observed.
    """

    def first_nonfinite(self, names_or_flags: Sequence[str]) -> str | None: ...


class HealthMonitor:
    """Evaluate the health rules incrementally.

    Args:
        config: rule thresholds; ``HealthConfig()`` by default.
        order: a :class:`~gradguard.health.origin.BackwardOrder` (or anything with
            ``first_nonfinite(names)``) to locate the origin of non-finite gradients
            and the layers that get no gradient.
        rules: the rule classes to run; :data:`~gradguard.health.rules.RULES` by default.

    After each :meth:`update`, :attr:`opened` holds the keys of the episodes reported
    for the first time and :attr:`to_warn` the findings that reached warning severity
    for the first time (what a listener warns about).
    """

    def __init__(
        self,
        config: HealthConfig | None = None,
        *,
        order: OrderLike | None = None,
        rules: Sequence[type[Rule]] = RULES,
    ):
        if config is None:
            config = HealthConfig()
        if not isinstance(config, HealthConfig):
            raise TypeError(f"config must be a HealthConfig, got {type(config).__name__}")
        self.config = config
        self.order = order
        self.rule_classes = tuple(rules)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.context = Context(self.config, self.order)
        self.rules = [cls(self.context) for cls in self.rule_classes]
        self._step_rules = [r for r in self.rules if r.scope != "layer"]
        self._layer_rules = [r for r in self.rules if r.scope == "layer"]
        self._started = False
        self.opened: list[str] = []
        self.to_warn: list[Finding] = []
        #: Episodes opened so far, per kind.
        self.counts: dict[Kind, int] = {}

    def update(self, batch: HostBatch) -> list[Finding]:
        """Evaluate the rules on one flushed batch; return the findings it changed, by step."""
        steps = _steps(batch)
        if len(steps) and not self._started:
            self._started = True
            self.context.first_step = int(steps.step[0])
        rows = steps.take(~steps.amp_overflow)
        for signal in self.context.signals:
            signal.update(rows)
        for rule in self._step_rules:
            rule.on_steps(steps if rule.amp_rows else rows)
        unreached = self._unreached(steps.names)
        for step, norms in sorted(steps.snapshots.items()):
            if not len(norms) or not np.isfinite(norms).all():
                continue  # the non-finite rule speaks for this snapshot
            snapshot = LayerSnapshot.build(step, steps.names, norms, self.config, unreached)
            for rule in self._layer_rules:
                rule.on_snapshot(snapshot)
        return self._collect()

    def note_events(self, events: Sequence[Event]) -> None:
        """Show recorded events (skips naming non-finite parameters) to the rules; what
        they change is reported by the next :meth:`update`."""
        events = list(events)
        for rule in self.rules:
            rule.on_events(events)

    def _collect(self) -> list[Finding]:
        found: list[Finding] = []
        self.opened, self.to_warn = [], []
        for rule in self.rules:
            reported, opened, warn = rule.take()
            found += reported
            self.opened += opened
            self.to_warn += warn
        for finding in found:
            if finding.key in self.opened:
                self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
        found.sort(key=reading_order)
        return found

    def _unreached(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Layers whose parameters require grad but got no gradient (from the order)."""
        unreached = getattr(self.order, "unreached", None)
        if unreached is None:
            return ()
        missing = tuple(unreached())
        if not missing or not self.config.group_by_module:
            return missing
        groups, _ = group_index(missing)
        return groups


def _steps(batch: HostBatch) -> Steps:
    n = len(batch.steps)
    for name, values in batch.columns.items():
        if len(values) != n:
            raise ValueError(f"batch.columns[{name!r}] has {len(values)} values for {n} steps")
    if len(batch.tensor_steps) != len(batch.tensor_norms):
        raise ValueError(
            f"batch.tensor_steps has {len(batch.tensor_steps)} entries but "
            f"batch.tensor_norms has {len(batch.tensor_norms)}"
        )
    names = tuple(batch.names)
    snapshots: dict[int, np.ndarray] = {}
    for step, norms in zip(batch.tensor_steps, batch.tensor_norms):
        values = np.asarray(norms, dtype=np.float64).reshape(-1)
        if not names:
            names = tuple(f"tensor[{i}]" for i in range(len(values)))
        if len(values) != len(names):
            raise ValueError(
                f"batch.tensor_norms rows have {len(values)} values for {len(names)} names"
            )
        snapshots[int(step)] = values

    def column(name: str) -> np.ndarray:
        values = batch.columns.get(_SOURCES.get(name, name))
        if values is None:
            return np.full(n, math.nan)
        return np.asarray(values, dtype=np.float64).reshape(n)

    data: dict[str, Any] = {name: column(name) for name in _COLUMNS}
    data["skipped"] = data["skipped"] == 1.0
    reason = data["reason"]
    data["reason"] = np.where(np.isfinite(reason), reason, 0).astype(np.int64)
    loss_given = "loss" in batch.columns and "loss" not in batch.absent
    return Steps(
        step=np.asarray(batch.steps, dtype=np.int64).reshape(n),
        **data,
        names=names,
        snapshots=snapshots,
        loss_given=loss_given,
    )


def diagnose(
    columns: Mapping[str, Sequence[float]],
    steps: Sequence[int],
    names: Sequence[str] = (),
    tensor_steps: Sequence[int] = (),
    tensor_norms: Sequence[Sequence[float]] = (),
    config: HealthConfig | None = None,
    *,
    order: OrderLike | None = None,
    events: Sequence[Event] = (),
    chunk: int = 1000,
) -> list[Finding]:
    """Run the health rules over a whole recorded run (steps in increasing order).

    ``columns`` maps step-column names (see ``STEP_COLUMNS``) to per-step values
    aligned with ``steps``; missing columns count as not recorded. Per-tensor snapshots
    ``tensor_norms[j]`` at ``tensor_steps[j]`` are aligned with ``names``. ``events``
    (e.g. a store's skip events) are shown to the rules after the chunk holding their
    step. The run is fed to a :class:`HealthMonitor` in chunks of ``chunk`` steps, as an
    online monitor would see it; the result is each episode's final state, by first step.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    step_array = np.asarray(steps, dtype=np.int64).reshape(-1)
    data = {
        key: np.asarray(values, dtype=np.float64).reshape(-1) for key, values in columns.items()
    }
    for key, values in data.items():
        if len(values) != len(step_array):
            raise ValueError(
                f"columns[{key!r}] has {len(values)} values for {len(step_array)} steps"
            )
    if len(tensor_steps) != len(tensor_norms):
        raise ValueError(
            f"tensor_steps has {len(tensor_steps)} entries but tensor_norms has {len(tensor_norms)}"
        )
    snapshots = sorted(
        zip(
            (int(s) for s in tensor_steps), (np.asarray(r, dtype=np.float64) for r in tensor_norms)
        ),
        key=lambda item: item[0],
    )
    pending = sorted(events, key=lambda e: e.step)
    monitor = HealthMonitor(config, order=order)
    found: dict[str, Finding] = {}
    loose: list[Finding] = []
    fed = shown = 0
    for start in range(0, max(len(step_array), 1), chunk):
        part = step_array[start : start + chunk]
        last = int(part[-1]) if len(part) else math.inf
        is_last = start + chunk >= len(step_array)
        take = fed
        while take < len(snapshots) and (is_last or snapshots[take][0] <= last):
            take += 1
        batch = HostBatch(
            steps=part.tolist(),
            columns={key: values[start : start + chunk] for key, values in data.items()},
            names=tuple(names),
            tensor_steps=[s for s, _ in snapshots[fed:take]],
            tensor_norms=[row for _, row in snapshots[fed:take]],
        )
        fed = take
        for finding in monitor.update(batch):
            if finding.key is None:
                loose.append(finding)
            else:
                found[finding.key] = finding
        upto = shown
        while upto < len(pending) and (is_last or pending[upto].step <= last):
            upto += 1
        if upto > shown:
            monitor.note_events(pending[shown:upto])
            shown = upto
    if shown:  # evidence from the last chunk's events
        for finding in monitor.update(HostBatch(steps=[], columns={})):
            found[finding.key or id(finding)] = finding  # type: ignore[index]
    out = [*found.values(), *loose]
    out.sort(key=reading_order)
    return out

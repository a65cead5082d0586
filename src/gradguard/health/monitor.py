"""The health rules run over recorded host numbers, online or as a replay.

:class:`HealthMonitor` dispatches each flushed :class:`~gradguard.schema.HostBatch` to
the rule objects of :data:`~gradguard.health.rules.RULES` (each step row to the step
rules, each snapshot to the layer rules) and returns their new findings. Every rule and
signal keeps bounded state (fixed-size windows, counters and latches), so an update
costs time proportional to the batch, not to the run. :func:`diagnose` replays a whole
recorded run through a monitor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from ..schema import HostBatch
from .base import Context, Rule, StepRow
from .config import HealthConfig
from .findings import Finding
from .rules import RULES, Kind
from .signals import LayerSnapshot

_NAN = float("nan")


class OrderLike(Protocol):
    """Anything that names the first non-finite parameter in backward order."""

    def first_nonfinite(self, names_or_flags: Sequence[str]) -> str | None: ...


class HealthMonitor:
    """Evaluate the health rules incrementally.

    Args:
        config: rule thresholds; ``HealthConfig()`` by default.
        order: a :class:`~gradguard.health.origin.BackwardOrder` (or anything with
            ``first_nonfinite(names)``) to locate the origin of non-finite gradients.
            Without one the origin is approximated by reverse registration order.
        rules: the rule classes to run; :data:`~gradguard.health.rules.RULES` by default.
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
        by_reads = {"all": [], "nonamp": [], "finite": []}
        for rule in self.rules:
            if rule.scope != "layer":
                by_reads[rule.reads].append(rule)
        self._every, self._nonamp, self._finite = (by_reads[k] for k in ("all", "nonamp", "finite"))
        self._layer = [rule for rule in self.rules if rule.scope == "layer"]
        #: Findings emitted so far, per kind.
        self.counts: dict[Kind, int] = {}

    def update(self, batch: HostBatch) -> list[Finding]:
        """Evaluate the rules on one flushed batch; return the findings it produced."""
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
        for row in _rows(batch, names):
            self._step(row)
        for step, norms in zip(batch.tensor_steps, batch.tensor_norms):
            self._snapshot(int(step), names, [float(v) for v in norms])
        out = [finding for rule in self.rules for finding in rule.take()]
        out.sort(key=lambda f: f.steps[1])  # the step each finding was decided at
        for finding in out:
            self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
        return out

    def _step(self, row: StepRow) -> None:
        for rule in self._every:
            rule.on_step(row)
        if row.amp_overflow:
            return  # the GradScaler handles its own overflows; the norm is of scaled grads
        for rule in self._nonamp:
            rule.on_step(row)
        if not row.finite:
            return  # nothing non-finite enters a window or a baseline
        signals = self.context.signals
        for signal in signals:
            signal.before_step(row)
        for rule in self._finite:
            rule.on_step(row)
        for signal in signals:
            signal.after_step(row)

    def _snapshot(self, step: int, names: tuple[str, ...], norms: list[float]) -> None:
        if not names:
            names = tuple(f"tensor[{i}]" for i in range(len(norms)))
        if len(names) != len(norms):
            raise ValueError(
                f"batch.tensor_norms rows have {len(norms)} values for {len(names)} names"
            )
        if not norms or not all(math.isfinite(v) for v in norms):
            return  # the non-finite rule speaks for this snapshot
        snapshot = LayerSnapshot.build(step, names, norms, self.config)
        for rule in self._layer:
            rule.on_snapshot(snapshot)


def _rows(batch: HostBatch, names: tuple[str, ...]):
    """The batch's steps as :class:`StepRow` objects, each with its snapshot if any."""
    n = len(batch.steps)
    snapshots = dict(zip(batch.tensor_steps, batch.tensor_norms))

    def column(name: str) -> Sequence[float]:
        values = batch.columns.get(name)
        return values if values is not None else [_NAN] * n

    columns = zip(
        batch.steps,
        column("total_norm"),
        column("threshold"),
        column("clipped"),
        column("skipped"),
        column("reason"),
        column("loss"),
        column("lr"),
        column("loss_scale"),
        column("clip_coef"),
    )
    for step, norm, threshold, clipped, skipped, reason, loss, lr, scale, coef in columns:
        reason = float(reason)
        yield StepRow(
            step=int(step),
            norm=float(norm),
            threshold=float(threshold),
            clipped=float(clipped),
            skipped=skipped == 1.0,
            reason=int(reason) if math.isfinite(reason) else 0,
            loss=float(loss),
            lr=float(lr),
            loss_scale=float(scale),
            clip_coef=float(coef),
            names=names,
            tensor_norms=snapshots.get(step),
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
    chunk: int = 1000,
) -> list[Finding]:
    """Run the health rules over a whole recorded run (steps in increasing order).

    ``columns`` maps step-column names (see ``STEP_COLUMNS``) to per-step values
    aligned with ``steps``; missing columns count as not recorded. Per-tensor snapshots
    ``tensor_norms[j]`` at ``tensor_steps[j]`` are aligned with ``names``. The run is fed
    to a :class:`HealthMonitor` in chunks of ``chunk`` steps, so the findings are those
    an online monitor would have emitted.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    step_list = [int(s) for s in steps]
    data = {
        key: np.asarray(values, dtype=np.float64).reshape(-1).tolist()
        for key, values in columns.items()
    }
    for key, values in data.items():
        if len(values) != len(step_list):
            raise ValueError(
                f"columns[{key!r}] has {len(values)} values for {len(step_list)} steps"
            )
    if len(tensor_steps) != len(tensor_norms):
        raise ValueError(
            f"tensor_steps has {len(tensor_steps)} entries but tensor_norms has {len(tensor_norms)}"
        )
    snapshots = sorted(
        zip(
            (int(s) for s in tensor_steps),
            (np.asarray(row, dtype=np.float64).tolist() for row in tensor_norms),
        ),
        key=lambda item: item[0],
    )
    monitor = HealthMonitor(config, order=order)
    found: list[Finding] = []
    fed = 0
    for start in range(0, max(len(step_list), 1), chunk):
        part = step_list[start : start + chunk]
        last = part[-1] if part else math.inf
        is_last = start + chunk >= len(step_list)
        take = fed
        while take < len(snapshots) and (is_last or snapshots[take][0] <= last):
            take += 1
        batch = HostBatch(
            steps=part,
            columns={key: values[start : start + chunk] for key, values in data.items()},
            names=tuple(names),
            tensor_steps=[s for s, _ in snapshots[fed:take]],
            tensor_norms=[row for _, row in snapshots[fed:take]],
        )
        fed = take
        found.extend(monitor.update(batch))
    return found

"""The host-side unit of recording: what the device half hands to stores, sinks and rules.

The device half (``Guard``) keeps per-step values as device tensors and copies them
to the host once per log interval; the result is a :class:`HostBatch` of plain
Python numbers. Everything downstream (run store, loggers, health rules, report)
reads only this, so it knows nothing of devices or frameworks.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: Per-step columns, in storage order. Floats are NaN where a value was not recorded.
STEP_COLUMNS: tuple[str, ...] = (
    "total_norm",  # pre-clip global norm of the real gradients (accumulated, unscaled, reduced)
    "clipped_norm",  # global norm after clipping (total_norm * clip_coef for global clips)
    "clip_coef",  # multiplier applied to the gradients (1.0 when nothing was clipped)
    "threshold",  # clip threshold in force this step (inf when no clip applies)
    "clipped",  # 1.0 when the gradients were scaled down, else 0.0
    "skipped",  # 1.0 when the optimizer step was skipped, else 0.0
    "reason",  # a SkipReason code (0 when not skipped)
    "loss",  # training loss when given, else NaN
    "lr",  # learning rate of the first param group when known, else NaN
    "loss_scale",  # AMP loss scale when a GradScaler is used, else NaN
)


class SkipReason(enum.IntEnum):
    """Why a step was skipped; stored as a small integer."""

    NONE = 0
    NONFINITE = 1  # a gradient held NaN or inf
    POLICY = 2  # a policy (e.g. SkipSpike) judged the step an outlier
    AMP_OVERFLOW = 3  # the AMP GradScaler found inf/NaN and skipped on its own

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class HostBatch:
    """Steps recorded since the last flush, as host numbers.

    ``columns[c][i]`` is column ``c`` at ``steps[i]``. ``tensor_steps[j]`` is a step at
    which per-tensor norms were snapshotted, with values ``tensor_norms[j]`` aligned
    with ``names``. ``absent`` names the columns that were not given at any step of
    the batch (their values are NaN placeholders, not measured NaNs); loggers skip them.
    """

    steps: list[int]
    columns: dict[str, list[float]]
    names: tuple[str, ...] = ()
    tensor_steps: list[int] = field(default_factory=list)
    tensor_norms: list[list[float]] = field(default_factory=list)
    absent: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Event:
    """Something that happened at a step: a skip, a finding, a configuration change."""

    step: int
    kind: str
    message: str
    data: dict = field(default_factory=dict)


@runtime_checkable
class Sink(Protocol):
    """A destination for recorded numbers: run store, TensorBoard, W&B, MLflow, console."""

    def start(self, names: Sequence[str], config: dict) -> None:
        """Called once before the first batch, with parameter names and run config."""

    def write(self, batch: HostBatch) -> None:
        """Write one flushed batch."""

    def write_events(self, events: Sequence[Event]) -> None:
        """Write events (findings, skips)."""

    def close(self) -> None:
        """Flush and release resources; called once."""

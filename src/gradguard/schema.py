"""The recorded format, in one torch-free place: step columns, skip reasons, events.

Every producer (the torch ``Guard``, the integrations, the Paddle/JAX/Keras front-ends,
the health rules, the privacy monitor) and every reader (run store, sinks, report,
``watch``, ``export``) uses these names, so a column or an event payload is defined
once. The device half hands the host a :class:`HostBatch` of plain numbers; nothing
here imports torch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, runtime_checkable

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
    """Why a step was skipped; stored as a small integer in the ``reason`` column."""

    NONE = 0
    NONFINITE = 1  # a gradient held NaN or inf
    POLICY = 2  # a policy (e.g. SkipSpike) judged the step an outlier
    AMP_OVERFLOW = 3  # the AMP GradScaler found inf/NaN and skipped on its own

    @property
    def label(self) -> str:
        return self.name.lower()


class EventKind:
    """The ``kind`` strings of recorded events (stable: they are stored in run stores)."""

    SKIP = "skip"  #: a skipped optimizer step; data: :class:`SkipData`
    PER_SAMPLE = "per_sample"  #: per-example norm statistics (DP runs); :class:`PerSampleData`
    REWIND = "rewind"  #: training state restored to an earlier step; data: :class:`RewindData`
    FINDING_PREFIX = "health."  #: ``health.<finding kind>``; data: :class:`FindingData`

    @staticmethod
    def finding(kind: str) -> str:
        """The event kind of a health finding of ``kind`` (``"health.exploding"``)."""
        return EventKind.FINDING_PREFIX + str(kind)

    @staticmethod
    def is_finding(kind: str) -> bool:
        """Whether an event kind is a health finding's."""
        return kind.startswith(EventKind.FINDING_PREFIX)


class SkipData(TypedDict, total=False):
    """Payload of a :attr:`EventKind.SKIP` event, the same from every producer."""

    reason: str  #: a :class:`SkipReason` label
    nonfinite: list[str]  #: parameters whose gradient held NaN/inf (empty when none)
    origin: str | None  #: first non-finite gradient in backward order, when known
    ranks: list[int] | None  #: ranks whose local gradients were non-finite (distributed)


class FindingData(TypedDict, total=False):
    """Payload of a ``health.*`` event (see :class:`gradguard.health.Finding`)."""

    severity: str  #: ``info``, ``warning`` or ``critical``
    steps: list[int]  #: ``[first, last]`` step of the evidence
    params: list[str]  #: parameters or layers involved, the origin first
    evidence: dict[str, float]  #: the numbers the rule decided on
    advice: list[str]  #: concrete actions, most useful first
    origin: str | None  #: a parameter, "forward" (data/loss/forward pass) or "backward"


class PerSampleData(TypedDict, total=False):
    """Payload of a :attr:`EventKind.PER_SAMPLE` event, from ``privacy.PerSampleMonitor``.

    ``exact`` and ``noised`` say which fields a DP guarantee covers. A field in
    ``noised`` was released through the DP mechanism the run already pays for (covered
    by epsilon); a field in ``exact`` is an exact statistic of the examples, NOT covered
    by epsilon (recorded only when the monitor was built with
    ``release_exact_statistics_not_private=True``). Fields in neither list are public
    (the expected batch size) or post-processing of noised releases (the clip norm).
    Events written before these lists existed hold exact statistics only.
    """

    exact: list[str]  #: names of the fields below that are exact (not private)
    noised: list[str]  #: names of the fields below released through the DP mechanism
    clip_norm: float | None  #: clip norm in force at the step
    expected_n: float  #: public expected number of examples per step
    #: 1 - the adaptive clip's noisy unclipped fraction (noised: may leave [0, 1])
    noised_fraction_clipped: float
    n: int  #: realised number of examples (exact: private under Poisson sampling)
    fraction_clipped: float | None  #: exact share of examples with norm > clip_norm
    quantiles: dict[str, float]  #: exact quantiles of per-example norms, by label ("0.5")
    mean: float  #: exact mean per-example norm
    max: float  #: exact largest per-example norm
    layers: dict[str, dict[str, float]]  #: exact quantiles per tensor (``by_layer=True``)


class RewindData(TypedDict, total=False):
    """Payload of a :attr:`EventKind.REWIND` event (see :class:`gradguard.Rewind`)."""

    from_step: int  #: step at which the divergence was confirmed
    to_step: int  #: step of the snapshot restored
    steps_lost: int  #: ``from_step - to_step``: optimizer steps undone
    reason: str  #: ``nonfinite`` (a NaN/inf loss or weights) or ``loss`` (the loss diverged)
    loss: float | None  #: median loss of the recent window when detected
    reference: float | None  #: median loss of the window before the snapshot restored
    #: the snapshot was restored before: the optimizer's momentum was dropped this time
    momentum_dropped: bool


def rewind_event(
    from_step: int,
    to_step: int,
    reason: str,
    loss: float | None = None,
    reference: float | None = None,
    momentum_dropped: bool = False,
) -> Event:
    """The one way to describe a rewind: same message and :class:`RewindData` payload."""
    lost = int(from_step) - int(to_step)
    detail = "a non-finite loss or weights" if reason == "nonfinite" else "the loss diverged"
    if reason == "loss" and loss is not None and reference is not None:
        detail += f" (median {loss:.4g} against {reference:.4g} before the snapshot)"
    data: RewindData = {
        "from_step": int(from_step),
        "to_step": int(to_step),
        "steps_lost": lost,
        "reason": reason,
        "loss": loss,
        "reference": reference,
        "momentum_dropped": bool(momentum_dropped),
    }
    message = f"step {from_step}: {detail}; rewound to step {to_step} ({lost} steps lost)"
    if momentum_dropped:
        message += "; restored before, so the optimizer's momentum was dropped"
    return Event(int(from_step), EventKind.REWIND, message, dict(data))


def skip_event(
    step: int,
    reason: SkipReason | str,
    nonfinite: Sequence[str] = (),
    origin: str | None = None,
    ranks: Sequence[int] | None = None,
    *,
    loss_nonfinite: bool = False,
) -> Event:
    """The one way to describe a skipped step, whoever skipped it (torch, a framework
    integration, a front-end): same message, same :class:`SkipData` payload.

    ``loss_nonfinite``: the step's loss was NaN/inf, so the non-finite values came from
    the input batch, the labels or the forward pass, not from a parameter's backward
    (every gradient is then non-finite); no parameter is named as the origin.
    """
    label = reason.label if isinstance(reason, SkipReason) else str(reason)
    names = list(nonfinite)
    where = ""
    if loss_nonfinite:
        origin = None
        where = (
            f"; the loss was non-finite: check the input batch, the labels and the forward "
            f"pass ({len(names)} tensors non-finite)"
        )
    elif origin:
        where = f"; non-finite gradients from {origin!r} ({len(names)} tensors)"
    elif names:
        where = f"; non-finite gradients in {len(names)} tensors"
    if ranks:
        where += f"; non-finite local gradients on rank(s) {list(ranks)}"
    data: SkipData = {
        "reason": label,
        "nonfinite": names,
        "origin": origin,
        "ranks": list(ranks) if ranks else None,
    }
    return Event(int(step), EventKind.SKIP, f"step {step} skipped ({label}){where}", dict(data))


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
    extra_tensor_steps: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Event:
    """Something that happened at a step: a skip, a finding, a rewind.

    Attributes:
        step: the step it happened at (an episode's first step).
        kind: an :class:`EventKind` string.
        message: one line for people.
        data: the kind's payload (JSON-serialisable).
        end_step: for an episode (a finding that lasts), its last step so far; ``None``
            for a point event.
        key: identifies an episode within a run: an event with the same ``key`` as an
            earlier one replaces it (its range, message and data are updated in place).
            ``None`` for events that are never updated.
        ongoing: ``True`` while an episode is open (later events with its ``key`` may
            extend it); ``False`` once it is closed, and for point events. Sinks that
            cannot update what they logged write an episode when it opens and when it
            closes, not at each extension.
    """

    step: int
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    end_step: int | None = None
    key: str | None = None
    ongoing: bool = False


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

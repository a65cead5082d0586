"""A run at a glance: its headline numbers and one verdict (healthy, recovered, lost)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..health import Finding, Kind, Severity
from ..schema import SkipReason
from .data import RunData

#: Findings that mark an incident the run had to survive (other findings are advice).
INCIDENT_KINDS = frozenset({Kind.NONFINITE, Kind.EXPLODING, Kind.SPIKE})
#: A trailing run of non-finite steps made only of skipped steps counts as lost from
#: this length on (a guard skipping a last bad batch or two has not lost the run).
LOST_SKIPPED_TAIL = 20
#: Steps averaged for the final loss.
FINAL_WINDOW = 50


@dataclass(frozen=True)
class Verdict:
    """``state``: ``empty``, ``healthy``, ``recovered``, ``ongoing`` or ``lost``."""

    state: str
    text: str
    lost_at: int | None = None
    incidents: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Summary:
    """The numbers a reader wants first."""

    steps: int
    first_step: int | None
    last_step: int | None
    final_loss: float
    final_window: int
    best_loss: float
    best_step: int | None
    wall_seconds: float
    steps_per_second: float
    clipped_share: float
    skipped: int
    nonfinite: int
    median_norm: float
    verdict: Verdict


def lost_at(steps: dict[str, np.ndarray]) -> int | None:
    """The step from which every recorded step is non-finite to the end, if any.

    A step is non-finite when its gradient norm is, or its loss is in a run that
    records the loss. A tail of only skipped steps counts when it is long
    (:data:`LOST_SKIPPED_TAIL`): the guard kept the weights, but training stopped.
    """
    norm = steps["total_norm"]
    if norm.size == 0:
        return None
    loss = steps["loss"]
    bad = ~np.isfinite(norm)
    if np.isfinite(loss).any():
        bad |= ~np.isfinite(loss)
    good = np.flatnonzero(~bad)
    first_bad = int(good[-1]) + 1 if good.size else 0
    if first_bad >= norm.size:
        return None
    tail = slice(first_bad, None)
    all_skipped = bool(steps["skipped"][tail].all())
    if all_skipped and norm.size - first_bad < LOST_SKIPPED_TAIL:
        return None
    return int(steps["step"][first_bad])


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _flag_runs(steps: np.ndarray, flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return [(int(steps[a]), int(steps[b])) for a, b in zip(starts, ends)]


def incidents(run: RunData) -> list[tuple[int, int]]:
    """Step ranges the run had to survive: non-finite or skipped steps (AMP overflows
    aside, which the loss scaler handles by design) and spike/exploding/non-finite or
    critical findings, overlapping ranges merged."""
    s = run.steps
    ranges = [
        f.steps for f in run.findings if f.kind in INCIDENT_KINDS or f.severity is Severity.CRITICAL
    ]
    if run.n_steps:
        overflow = s["reason"] == int(SkipReason.AMP_OVERFLOW)
        flags = (~np.isfinite(s["total_norm"]) | s["skipped"]) & ~overflow
        ranges += _flag_runs(s["step"], flags)
    return _merge([(int(a), int(b)) for a, b in ranges])


def verdict(run: RunData) -> Verdict:
    """One line on the run's fate."""
    if run.n_steps == 0:
        return Verdict("empty", "no steps recorded")
    lost = lost_at(run.steps)
    found = tuple(incidents(run))
    if lost is not None:
        return Verdict("lost", f"lost at step {lost}", lost, found)
    last = run.last_step
    if found and last is not None and found[-1][1] >= last:
        return Verdict("ongoing", f"incident ongoing since step {found[-1][0]}", None, found)
    if found:
        n = len(found)
        return Verdict("recovered", f"recovered from {n} incident{'s' * (n != 1)}", None, found)
    return Verdict("healthy", "healthy")


def _final_loss(loss: np.ndarray) -> tuple[float, int]:
    """Mean of the finite losses of the last :data:`FINAL_WINDOW` steps; NaN when the
    last step's loss is non-finite (a skipped bad batch before the end does not count)."""
    if not np.isfinite(loss).any():
        return math.nan, 0  # no loss recorded
    window = min(FINAL_WINDOW, loss.size)
    tail = loss[-window:]
    if not math.isfinite(float(tail[-1])):
        return math.nan, window
    return float(tail[np.isfinite(tail)].mean()), window


def summarize(run: RunData) -> Summary:
    """Headline numbers and the verdict of ``run``."""
    s = run.steps
    n = run.n_steps
    loss = s["loss"]
    final, window = _final_loss(loss)
    finite_loss = np.isfinite(loss)
    best = int(np.argmin(np.where(finite_loss, loss, np.inf))) if finite_loss.any() else None
    norms = s["total_norm"]
    finite_norm = norms[np.isfinite(norms)]
    seconds = run.wall_seconds
    return Summary(
        steps=n,
        first_step=int(s["step"][0]) if n else None,
        last_step=run.last_step,
        final_loss=final,
        final_window=window,
        best_loss=float(loss[best]) if best is not None else math.nan,
        best_step=int(s["step"][best]) if best is not None else None,
        wall_seconds=seconds,
        steps_per_second=n / seconds if n and seconds > 0 else math.nan,
        clipped_share=float(s["clipped"].mean()) if n else math.nan,
        skipped=int(s["skipped"].sum()),
        nonfinite=int(n - finite_norm.size),
        median_norm=float(np.median(finite_norm)) if finite_norm.size else math.nan,
        verdict=verdict(run),
    )


def top_findings(findings: list[Finding], k: int = 3) -> list[Finding]:
    """The ``k`` findings to read first: most severe, then earliest."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.steps[0]))[:k]

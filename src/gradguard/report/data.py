"""Everything a report or a terminal view reads from a run store, in one object."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..health import Finding, HealthConfig, diagnose
from ..health.findings import reading_order
from ..layers import group_index
from ..record.store import RunStore, StoreError
from ..schema import Event, EventKind

#: Runs longer than this are not replayed through the health rules unless asked:
#: a replay costs ~100 s per million steps; live-recorded findings cost nothing.
REPLAY_MAX_STEPS = 200_000


def open_run(path: str | os.PathLike[str]) -> RunStore:
    """Open a run directory (or ``.db`` file) for reading, with a clear error otherwise."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise StoreError(f"{p!r} does not exist")
    return RunStore.open(p)


def combine_l2(norms: np.ndarray, index: np.ndarray, groups: int) -> np.ndarray:
    """``(rows, groups)``: the L2 norm of the columns of ``norms`` sharing an ``index``
    (the norm of a group is the L2 of its members' norms); every group must have one."""
    index = np.asarray(index, dtype=np.int64)
    norms = np.asarray(norms)
    if norms.shape[0] == 0:
        return np.zeros((0, groups))
    squares = np.square(norms, dtype=np.float64)  # float64: a 1e-20 norm must not vanish
    if np.any(np.diff(index) < 0):  # members not contiguous: bring them together
        order = np.argsort(index, kind="stable")
        index, squares = index[order], squares[:, order]
    starts = np.searchsorted(index, np.arange(groups))
    return np.sqrt(np.add.reduceat(squares, starts, axis=1))


def group_layers(names: tuple[str, ...], norms: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Combine per-tensor norm columns per owning module, in model order (L2 of members)."""
    groups, positions = group_index(names)
    return groups, combine_l2(norms, np.asarray(positions), len(groups))


@dataclass
class RunData:
    """A recorded run, read once: step columns, layer norms, events and findings.

    ``findings`` hold the episodes the health rules recorded live (their ``steps`` are
    the episode's true range), or a replay of the rules over the run when it recorded
    none (``findings_replayed``).
    """

    path: str
    meta: dict[str, Any]
    names: tuple[str, ...]
    steps: dict[str, np.ndarray]
    snapshot_steps: np.ndarray
    layers: tuple[str, ...]
    layer_norms: np.ndarray  # (snapshots, layers) float64
    events: list[Event]
    findings: list[Finding] = field(default_factory=list)
    findings_replayed: bool = False
    wall_seconds: float = math.nan

    @property
    def n_steps(self) -> int:
        return int(self.steps["step"].size)

    @property
    def last_step(self) -> int | None:
        return int(self.steps["step"][-1]) if self.n_steps else None


def health_config(meta: dict[str, Any]) -> HealthConfig:
    """The rules' configuration for a run: its recorded family when known, else default."""
    config = meta.get("config") or {}
    family = config.get("family") if isinstance(config, dict) else None
    try:
        return HealthConfig(family=family) if isinstance(family, str) else HealthConfig()
    except ValueError:
        return HealthConfig()


def stored_findings(events: list[Event]) -> list[Finding]:
    """Findings recorded as ``health.*`` events, with the episode's range when it has one
    (``Event.end_step``); malformed ones are skipped."""
    out = []
    for event in events:
        if not EventKind.is_finding(event.kind):
            continue
        try:
            finding = Finding.from_event(event)
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        end = getattr(event, "end_step", None)
        if isinstance(end, int) and end >= event.step:
            finding = dataclasses.replace(finding, steps=(int(event.step), int(end)))
        out.append(finding)
    return out


def merge_findings(*groups: list[Finding]) -> list[Finding]:
    """Findings from several sources, earlier groups first, one per kind and start step."""
    seen: set[tuple[str, int]] = set()
    out = []
    for finding in (f for group in groups for f in group):
        key = (finding.kind.value, finding.steps[0])
        if key not in seen:
            seen.add(key)
            out.append(finding)
    out.sort(key=reading_order)
    return out


def wall_seconds(meta: dict[str, Any], db: Path) -> float:
    """Seconds from the store's creation (the first recorded step) to its last write."""
    try:
        created = _dt.datetime.fromisoformat(str(meta["created"]))
    except (KeyError, ValueError):
        return math.nan
    times = [p.stat().st_mtime for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
    if not times or created.tzinfo is None:
        return math.nan
    seconds = max(times) - created.timestamp()
    return seconds if seconds >= 0 else math.nan


def load_run(path: str | os.PathLike[str], *, rules: bool | None = None) -> RunData:
    """Read a whole run.

    ``rules``: replay the health rules over the run (``True``), never (``False``), or
    only when the run recorded no finding of its own and has at most
    :data:`REPLAY_MAX_STEPS` steps (``None``, the default).
    """
    with open_run(path) as store:
        meta = store.meta()
        names = tuple(meta.get("names") or ())
        steps = store.steps()
        snap_steps, _, norms = store.tensor_norms()
        events = store.events()
        db = Path(store.path)
    layers, layer_norms = group_layers(names, norms) if names else ((), np.zeros((0, 0)))
    data = RunData(os.fspath(path), meta, names, steps, snap_steps, layers, layer_norms, events)
    data.wall_seconds = wall_seconds(meta, db)
    recorded = stored_findings(events)
    replay = rules if rules is not None else not recorded and data.n_steps <= REPLAY_MAX_STEPS
    found: list[Finding] = []
    if replay and data.n_steps:
        columns = {k: v for k, v in steps.items() if k != "step"}
        found = diagnose(
            columns, steps["step"], names, snap_steps, norms, health_config(meta), chunk=20_000
        )
    data.findings = merge_findings(recorded, found)
    data.findings_replayed = bool(found) and not recorded
    return data

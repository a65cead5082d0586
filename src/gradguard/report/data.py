"""Everything a report or a terminal view reads from a run store, in one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..health import Finding, HealthConfig, diagnose
from ..health.findings import EVENT_PREFIX
from ..layers import group_index
from ..record.store import RunStore, StoreError
from ..schema import Event


def open_run(path: str | os.PathLike[str]) -> RunStore:
    """Open a run directory (or ``.db`` file) for reading, with a clear error otherwise."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise StoreError(f"{p!r} does not exist")
    return RunStore.open(p)


def group_layers(names: tuple[str, ...], norms: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Combine per-tensor norm columns per owning module, in model order (L2 of members)."""
    groups, positions = group_index(names)
    index = np.asarray(positions, dtype=np.int64)
    out = np.zeros((norms.shape[0], len(groups)), dtype=np.float64)
    squares = np.asarray(norms, dtype=np.float64) ** 2
    for j in range(len(groups)):
        out[:, j] = np.sqrt(squares[:, index == j].sum(axis=1))
    return groups, out


@dataclass
class RunData:
    """A recorded run, read once: step columns, layer norms, events and findings."""

    path: str
    meta: dict[str, Any]
    names: tuple[str, ...]
    steps: dict[str, np.ndarray]
    snapshot_steps: np.ndarray
    layers: tuple[str, ...]
    layer_norms: np.ndarray  # (snapshots, layers) float64
    events: list[Event]
    findings: list[Finding] = field(default_factory=list)

    @property
    def n_steps(self) -> int:
        return int(self.steps["step"].size)


def health_config(meta: dict[str, Any]) -> HealthConfig:
    """The rules' configuration for a run: its recorded family when known, else default."""
    config = meta.get("config") or {}
    family = config.get("family") if isinstance(config, dict) else None
    try:
        return HealthConfig(family=family) if isinstance(family, str) else HealthConfig()
    except ValueError:
        return HealthConfig()


def stored_findings(events: list[Event]) -> list[Finding]:
    """Findings recorded as ``health.*`` events (malformed ones are skipped)."""
    out = []
    for event in events:
        if event.kind.startswith(EVENT_PREFIX):
            try:
                out.append(Finding.from_event(event))
            except (ValueError, TypeError, KeyError, IndexError):
                continue
    return out


def merge_findings(*groups: list[Finding]) -> list[Finding]:
    """Findings from several sources, earlier groups first, one per kind and start step.

    Pass the findings recorded live first: they carry what a replay cannot know, such
    as the exact backward-order origin of a non-finite gradient.
    """
    seen: set[tuple[str, int]] = set()
    out = []
    for finding in (f for group in groups for f in group):
        key = (finding.kind.value, finding.steps[0])
        if key not in seen:
            seen.add(key)
            out.append(finding)
    out.sort(key=lambda f: (f.steps[0], -f.severity.rank))
    return out


def load_run(path: str | os.PathLike[str], *, run_rules: bool = True) -> RunData:
    """Read a whole run; with ``run_rules`` replay the health rules over it."""
    with open_run(path) as store:
        meta = store.meta()
        names = tuple(meta.get("names") or ())
        steps = store.steps()
        snap_steps, _, norms = store.tensor_norms()
        events = store.events()
    layers, layer_norms = group_layers(names, norms) if names else ((), np.zeros((0, 0)))
    data = RunData(os.fspath(path), meta, names, steps, snap_steps, layers, layer_norms, events)
    found: list[Finding] = []
    if run_rules and data.n_steps:
        columns = {k: v for k, v in steps.items() if k != "step"}
        found = diagnose(
            columns, steps["step"], names, snap_steps, norms, health_config(meta), chunk=20_000
        )
    data.findings = merge_findings(stored_findings(events), found)
    return data

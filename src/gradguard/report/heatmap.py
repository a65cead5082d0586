"""Per-layer norms for the report's heatmap: modules in model order, grouped, compact.

Rows are the model's layers (parameters grouped by owning module with
:func:`gradguard.layers.group_index`), under collapsible parent groups when there
are many (``blocks.3`` holding ``blocks.3.attn`` and ``blocks.3.mlp``). Columns are
snapshot steps, bucketed to at most :data:`MAX_COLUMNS` (max per bucket, so no spike
is lost); the last snapshot always has a column of its own, so the default view is
exact. Norms travel as 16-bit codes of their log10 (0.1% resolution), which keeps a
1,000-layer run's heatmap well under a megabyte.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layers import group_index
from .data import RunData, combine_l2
from .sample import bucket_starts, reduce_max

MAX_COLUMNS = 400
#: Cells (rows x columns) a heatmap may hold; wide models get fewer columns.
MAX_CELLS = 400_000
MIN_COLUMNS = 60
#: Layers shown without parent groups.
FLAT_ROWS = 40
#: Layers beyond this are merged, consecutive ones, into combined rows.
MAX_LAYERS = 2000
ZERO, NONFINITE, TOP = 0, 65535, 65534


def column_starts(n: int, columns: int) -> np.ndarray:
    """At most ``columns`` buckets of ``n`` snapshots; the last snapshot alone in the last."""
    if n <= 1 or columns <= 1:
        return np.zeros(min(n, 1), dtype=np.int64)
    return np.append(bucket_starts(n - 1, columns - 1), n - 1)


def _by_depth(names: tuple[str, ...], modules: int) -> tuple[list[str], np.ndarray] | None:
    """Parent groups at the name depth that leaves the fewest rows to scan (groups plus
    the largest group), and each module's parent; ``None`` when no depth groups."""
    _, module_index = group_index(names)
    owner = np.asarray(module_index, dtype=np.int64)
    best, best_rows = None, modules
    for depth in range(1, max(n.count(".") for n in names) + 1):
        groups, index = group_index(names, depth)
        if not 2 <= len(groups) < modules:
            continue
        parent = np.empty(modules, dtype=np.int64)
        parent[owner] = index  # a module's tensors share their first `depth` parts
        rows = len(groups) + int(np.bincount(parent).max())
        if rows < best_rows:
            best, best_rows = (list(groups), parent), rows
    return best


def hierarchy(names: tuple[str, ...], layers: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Parent groups of ``layers`` and each layer's parent (no groups for a few layers).

    ``names`` are the parameter names the layers were grouped from, or the layers
    themselves when they were merged; a model without name structure is grouped in
    blocks of consecutive layers.
    """
    if len(layers) <= FLAT_ROWS:
        return [], np.full(len(layers), -1)
    found = _by_depth(names, len(layers)) if names != layers else None
    if found is not None:
        return found
    size = math.ceil(math.sqrt(len(layers)))
    labels = [
        f"{layers[a]} … {layers[min(a + size, len(layers)) - 1]}"
        for a in range(0, len(layers), size)
    ]
    return labels, np.arange(len(layers)) // size


def quantize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint16 codes: 0 zero, 65535 non-finite, else log10 mapped onto 1..65534."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log10(np.where(v > 0, v, 1.0)) - lo) / (hi - lo)
    codes = 1 + np.rint(np.clip(t, 0.0, 1.0) * (TOP - 1))
    codes = np.where(v > 0, codes, ZERO)
    codes = np.where(np.isfinite(v), codes, NONFINITE)
    return codes.astype("<u2")


def _bounds(values: np.ndarray) -> tuple[float, float]:
    ok = values[np.isfinite(values) & (values > 0)]
    if ok.size == 0:
        return -1.0, 1.0
    lo, hi = math.floor(math.log10(ok.min())), math.ceil(math.log10(ok.max()))
    return float(lo), float(hi if hi > lo else lo + 1)


def merge_layers(
    layers: tuple[str, ...], norms: np.ndarray, limit: int = MAX_LAYERS
) -> tuple[tuple[str, ...], np.ndarray]:
    """At most ``limit`` layers: consecutive ones combined (L2), labelled ``a … b (k layers)``."""
    if len(layers) <= limit:
        return layers, norms
    starts = bucket_starts(len(layers), limit)
    sizes = np.diff(np.append(starts, len(layers)))
    merged = combine_l2(norms, np.repeat(np.arange(starts.size), sizes), starts.size)
    labels = tuple(
        layers[a] if k == 1 else f"{layers[a]} … {layers[a + k - 1]} ({k} layers)"
        for a, k in zip(starts.tolist(), sizes.tolist())
    )
    return labels, merged


@dataclass(frozen=True)
class Rows:
    """The heatmap's rows: each parent group followed by its layers (a group of one layer
    is just the layer). ``source[j]`` is ``(False, layer)`` or ``(True, group)``."""

    rows: list[dict[str, Any]]
    source: list[tuple[bool, int]]
    parent: np.ndarray  # each layer's group (-1 without groups)
    groups: int

    def matrix(self, norms: np.ndarray) -> np.ndarray:
        """``(columns, rows)`` from per-layer norms; a group is the L2 of its layers."""
        grouped = combine_l2(norms, self.parent, self.groups) if self.groups else norms[:, :0]
        return np.stack([(grouped if g else norms)[:, i] for g, i in self.source], axis=1)


def layer_rows(names: tuple[str, ...], layers: tuple[str, ...]) -> Rows:
    """Rows for ``layers`` (grouped from parameter ``names``), in model order."""
    parents, parent = hierarchy(names, layers)
    if not parents:
        rows = [{"name": n, "parent": -1} for n in layers]
        return Rows(rows, [(False, i) for i in range(len(layers))], parent, 0)
    rows: list[dict[str, Any]] = []
    source: list[tuple[bool, int]] = []
    for g, label in enumerate(parents):
        members = np.flatnonzero(parent == g).tolist()
        if len(members) == 1:
            rows.append({"name": layers[members[0]], "parent": -1})
            source.append((False, members[0]))
            continue
        here = len(rows)
        rows.append({"name": label, "parent": -1, "group": True, "members": len(members)})
        source.append((True, g))
        for m in members:
            rows.append({"name": layers[m], "parent": here})
            source.append((False, m))
    return Rows(rows, source, parent, len(parents))


def heatmap_payload(run: RunData) -> dict[str, Any] | None:
    """The per-layer view of ``run`` for the page, or ``None`` without snapshots.

    Snapshot columns are bucketed first (max per bucket); a group's cell then combines
    its layers' cells, exactly for a one-snapshot column (the last one, and every column
    of a run with few snapshots) and as an upper bound of the group's norm otherwise.
    """
    if run.layer_norms.size == 0:
        return None
    layers, norms = merge_layers(tuple(run.layers), run.layer_norms)
    names = run.names if layers == tuple(run.layers) else layers
    plan = layer_rows(names, layers)
    n = norms.shape[0]
    budget = max(MIN_COLUMNS, MAX_CELLS // max(len(plan.rows), 1))
    starts = column_starts(n, min(MAX_COLUMNS, budget))
    cols = plan.matrix(reduce_max(norms, starts, axis=0))
    lo, hi = _bounds(cols)
    ends = np.append(starts[1:], n) - 1
    steps = run.snapshot_steps
    codes = quantize(cols.T, lo, hi)  # rows x columns
    return {
        "rows": plan.rows,
        "start": steps[starts].tolist(),
        "end": steps[ends].tolist(),
        "count": np.diff(np.append(starts, n)).tolist(),
        "snapshots": int(n),
        "lo": lo,
        "hi": hi,
        "codes": base64.b64encode(codes.tobytes()).decode("ascii"),
    }

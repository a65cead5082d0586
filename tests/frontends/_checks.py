"""Checks shared by the front-end tests: a recorded run reads back like a PyTorch one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradguard.health import diagnose
from gradguard.record import STEP_COLUMNS, RunStore


def check_store(run_dir: Path, steps: int, names: tuple[str, ...], framework: str) -> dict:
    """Open the store, check steps/names/snapshots/meta and run the health rules on it."""
    store = RunStore.open(run_dir)
    data = store.steps()
    assert data["step"].tolist() == list(range(1, steps + 1))
    assert np.isfinite(data["total_norm"][~data["skipped"]]).all()
    assert (data["total_norm"][~data["skipped"]] > 0).all()
    assert store.names() == names
    t_steps, t_names, t_norms = store.tensor_norms()
    assert len(t_steps) > 0 and t_names == names
    assert t_norms.shape == (len(t_steps), len(names))
    # per-tensor norms combine to the recorded total norm at the snapshot steps
    where = {s: i for i, s in enumerate(data["step"].tolist())}
    for s, row in zip(t_steps.tolist(), t_norms):
        total = data["total_norm"][where[s]]
        if math.isfinite(total):
            assert math.isclose(
                float(np.sqrt(np.sum(row.astype(np.float64) ** 2))), total, rel_tol=1e-4
            )
    assert store.meta()["config"]["framework"] == framework
    findings = diagnose(
        {c: data[c] for c in STEP_COLUMNS},
        data["step"],
        names=t_names,
        tensor_steps=t_steps,
        tensor_norms=t_norms,
    )
    return {"data": data, "store": store, "findings": findings}

"""A run's chart series on the shared grid: spikes, marks and absent columns."""

from __future__ import annotations

import math

import numpy as np

from gradguard.report import load_run
from gradguard.report.sample import Grid
from gradguard.report.series import clip_window, floats, run_series
from tests.report.runs import write_synthetic


def test_floats_round_and_turn_nonfinite_into_none():
    assert floats(np.array([1.234567891, np.nan, np.inf, -2e-9])) == [1.2346, None, None, -2e-9]


def test_spikes_skips_and_nonfinite_steps_survive_a_100k_step_run(tmp_path):
    n = 100_000
    truth = write_synthetic(tmp_path / "run", n, ["a.weight"], every=1000, batch=n)
    run = load_run(tmp_path / "run", rules=False)
    grid = Grid.over([run.steps["step"]])
    series = run_series(run, grid)
    assert len(series["norm_max"]) == len(grid) == 2000
    for step in truth["spikes"]:
        assert series["norm_max"][grid.locate([step])[0]] == 1e4
    inf_step = (2 * n) // 3
    assert series["nonfinite_steps"] == [inf_step] and series["skip_steps"] == [inf_step]
    assert series["norm_nonfinite"][grid.locate([inf_step])[0]] == 1
    assert sum(series["count"]) == n
    assert sum(series["clipped"]) == int(truth["clipped"].sum())
    assert series["clip_window"] == clip_window(n) == 200
    # loss, lr and loss scale were never recorded: no series for them
    assert not {"loss_mean", "lr", "loss_scale"} & set(series)


def test_recorded_loss_and_its_nonfinite_steps(tmp_path):
    from gradguard.record.store import RunStore
    from gradguard.schema import STEP_COLUMNS, HostBatch

    n = 40
    cols = {c: [math.nan] * n for c in STEP_COLUMNS}
    cols.update(total_norm=[1.0] * n, clipped=[0.0] * n, skipped=[0.0] * n, reason=[0.0] * n)
    cols["loss"] = [1.0 / (i + 1) for i in range(n)]
    cols["loss"][30:] = [math.nan] * 10
    cols["lr"] = [0.1] * n
    store = RunStore(tmp_path / "run")
    store.start(["w"])
    store.write(HostBatch(list(range(n)), cols, ("w",)))
    store.close()
    run = load_run(tmp_path / "run", rules=False)
    series = run_series(run, Grid.over([run.steps["step"]]))
    assert series["loss_mean"][:2] == [1.0, 0.5] and series["loss_mean"][30:] == [None] * 10
    assert series["loss_nonfinite"][30:] == [1] * 10
    assert series["lr"] == [0.1] * n
    assert "threshold" not in series and "clip_rate" not in series  # nothing was ever clipped

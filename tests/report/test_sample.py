"""The shared step grid and its per-bucket reductions: no spike, flag or gap is lost."""

from __future__ import annotations

import numpy as np
import pytest

from gradguard.report.sample import Grid, bucket_starts, reduce, reduce_max, rolling_mean


def test_bucket_starts_cover_every_point_in_near_equal_runs():
    starts = bucket_starts(10_007, 2000)
    assert starts[0] == 0 and starts.size == 2000
    sizes = np.diff(np.append(starts, 10_007))
    assert sizes.min() >= 5 and sizes.max() <= 6
    assert bucket_starts(0).size == 0 and bucket_starts(3, 10).tolist() == [0, 1, 2]


def test_a_short_run_gets_one_bucket_per_step():
    grid = Grid.over([np.arange(5, 605)])
    assert len(grid) == 600
    assert grid.start.tolist() == grid.end.tolist() == list(range(5, 605))


def test_the_grid_spans_every_run_of_a_comparison():
    grid = Grid.over([np.arange(0, 1000), np.arange(500, 250_000)], buckets=2000)
    assert len(grid) == 2000
    assert grid.start[0] == 0 and grid.end[-1] == 249_999
    assert np.all(grid.start[1:] == grid.end[:-1] + 1)  # contiguous, no overlap
    assert len(Grid.over([np.zeros(0)])) == 0


def test_min_and_max_keep_every_spike_and_the_minimum():
    rng = np.random.default_rng(1)
    steps = np.arange(100_003)
    values = rng.uniform(0.5, 1.5, steps.size)
    spikes = rng.choice(steps.size, 17, replace=False)
    values[spikes] = 1e3 + np.arange(17)
    values[5] = 1e-9
    grid = Grid.over([steps], 2000)
    high, low = reduce(grid, steps, values, "max"), reduce(grid, steps, values, "min")
    for i in spikes:
        assert high[grid.locate([i])[0]] == values[i]
    assert low.min() == pytest.approx(1e-9)
    mean = reduce(grid, steps, values, "mean")
    assert np.all((low <= mean) & (mean <= high))


def test_nonfinite_values_are_counted_not_plotted():
    steps = np.arange(6)
    values = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0])
    grid = Grid.over([steps], 3)
    assert reduce(grid, steps, values, "max").tolist() == [2.0, 3.0, 4.0]
    assert reduce(grid, steps, values, "nonfinite").tolist() == [0, 1, 1]
    assert reduce(grid, steps, values, "count").tolist() == [2, 2, 2]
    assert reduce(grid, steps, values, "last").tolist() == [2.0, 3.0, 4.0]


def test_buckets_without_points_are_empty_not_zero():
    grid = Grid.over([np.arange(0, 10)], 10)
    steps = np.array([0, 1, 7])  # a resumed run with a gap
    values = np.array([1.0, 2.0, 3.0])
    mean = reduce(grid, steps, values, "mean")
    assert mean[[0, 1, 7]].tolist() == [1.0, 2.0, 3.0]
    assert np.isnan(mean[[2, 3, 4, 5, 6, 8, 9]]).all()
    assert reduce(grid, steps, values, "count")[2] == 0


def test_reduce_rejects_unsorted_or_outlying_steps_and_unknown_reductions():
    grid = Grid.over([np.arange(10)], 10)
    with pytest.raises(ValueError, match="increasing"):
        reduce(grid, np.array([3, 1]), np.array([1.0, 2.0]), "max")
    with pytest.raises(ValueError, match="how must be"):
        reduce(grid, np.arange(3), np.ones(3), "median")
    with pytest.raises(ValueError, match="beyond the grid"):
        reduce(grid, np.array([5, 12]), np.ones(2), "max")


def test_rolling_mean_matches_a_direct_window():
    x = np.random.default_rng(2).integers(0, 2, 500).astype(float)
    got = rolling_mean(x, 50)
    want = [x[max(0, i - 49) : i + 1].mean() for i in range(500)]
    assert np.allclose(got, want)


def test_reduce_max_marks_a_run_holding_a_nonfinite_value():
    values = np.array([[1.0, 5.0, np.nan, 2.0]])
    assert reduce_max(values, np.array([0, 2]), axis=1).tolist() == [[5.0, np.inf]]

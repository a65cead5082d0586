"""Rolling windows over batches agree with a plain loop, whatever the batching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health.windows import Counts, Rolling, Streaks, last_finite, run_lengths


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=80),
    size=st.integers(1, 12),
    cut=st.integers(1, 30),
    include=st.booleans(),
    stat=st.sampled_from(["median", "min", "spread"]),
)
def test_rolling_matches_a_loop(values, size, cut, include, stat):
    rolling = Rolling(size)
    got, counts = [], []
    for lo in range(0, len(values), cut):
        out, n = rolling.push(np.array(values[lo : lo + cut]), stat, include)
        got += out.tolist()
        counts += n.tolist()
    reduce = {
        "median": np.median,
        "min": np.min,
        "spread": lambda v: (np.percentile(v, 75) - np.percentile(v, 25)) / 2,
    }[stat]
    for i in range(len(values)):
        end = i + int(include)
        window = values[max(0, end - size) : end]
        assert counts[i] == len(window)
        assert (np.isnan(got[i]) and not window) or np.isclose(got[i], reduce(window))
    assert len(rolling) <= size


def test_counts_and_run_lengths():
    counts = Counts(3, 1)
    first, size = counts.push(np.array([[1], [0], [1]]))
    second, _ = counts.push(np.array([[1], [1]]))
    assert first[:, 0].tolist() == [1, 1, 2] and size.tolist() == [1, 2, 3]
    assert second[:, 0].tolist() == [2, 3]
    assert run_lengths(np.array([1, 1, 0, 1], dtype=bool), carry=2).tolist() == [3, 4, 0, 1]


def test_streaks_track_each_name():
    s = Streaks()
    assert s.update(0, {"a": True, "b": False}) == {"a": (1, 0)}
    assert s.update(5, {"a": True, "b": True}) == {"a": (2, 0), "b": (1, 5)}
    assert s.update(9, {"a": False, "b": True}) == {"b": (2, 5)}


def test_last_finite_carries_the_last_finite_value_forward():
    nan = float("nan")
    values = np.array([nan, 2.0, nan, nan, 5.0])
    assert last_finite(values, 1.0).tolist() == [1.0, 2.0, 2.0, 2.0, 5.0]
    assert last_finite(values, 1.0, include=False).tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert len(last_finite(np.array([]), 1.0)) == 0

"""Rolling windows over batches agree with a plain loop, whatever the batching."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health.windows import (
    _SORTED,
    Counts,
    Rolling,
    Streaks,
    last_finite,
    median,
    run_lengths,
)


@settings(max_examples=100, deadline=None)
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
        if window:  # bit for bit what one sort of this window alone gives
            assert got[i] == _SORTED[stat](np.sort(window)[None, :])[0]
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
    assert _runs(s.update(0, ("a", "b"), np.array([True, False]))) == [(1, 0), (0, 0)]
    assert _runs(s.update(5, ("a", "b"), np.array([True, True]))) == [(2, 0), (1, 5)]
    assert _runs(s.update(9, ("a", "b"), np.array([False, True])))[1] == (2, 5)
    # a name left out keeps its run for when it returns
    assert _runs(s.update(12, ("c", "b"), np.array([True, True]))) == [(1, 12), (3, 5)]
    assert _runs(s.update(14, ("b", "a"), np.array([True, True]))) == [(4, 5), (1, 14)]


def _runs(update: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
    """(length, first) per name, first only where the run is under way."""
    length, first = update
    return [(n, f if n else 0) for n, f in zip(length.tolist(), first.tolist())]


@settings(max_examples=60, deadline=None)
@given(
    rounds=st.lists(
        st.tuples(
            st.lists(st.sampled_from("abcdef"), min_size=0, max_size=6, unique=True),
            st.lists(st.booleans(), min_size=6, max_size=6),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_streaks_match_a_dict_of_runs(rounds):
    """The array runs agree with a plain per-name dict, whatever names each update lists."""
    streaks, plain = Streaks(), {}
    for step, (names, hits) in enumerate(rounds):
        hits = hits[: len(names)]
        length, first = streaks.update(step, tuple(names), np.array(hits, dtype=bool))
        for i, (name, hit) in enumerate(zip(names, hits)):
            run, start = plain.get(name, (0, step))
            run, start = ((run + 1, start) if run else (1, step)) if hit else (0, start)
            plain[name] = (run, start)
            assert length[i] == run
            if run:
                assert first[i] == start


def test_last_finite_carries_the_last_finite_value_forward():
    nan = float("nan")
    values = np.array([nan, 2.0, nan, nan, 5.0])
    assert last_finite(values, 1.0).tolist() == [1.0, 2.0, 2.0, 2.0, 5.0]
    assert last_finite(values, 1.0, include=False).tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert len(last_finite(np.array([]), 1.0)) == 0


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, -0.0, 1.0]), st.just(np.nan)),
        min_size=1,
        max_size=40,
    )
)
def test_median_is_numpys_bit_for_bit(values):
    array = np.array(values)
    expected = float(np.median(array))
    got = median(array)
    assert np.array_equal([got], [expected], equal_nan=True)
    assert np.signbit(got) == np.signbit(expected)

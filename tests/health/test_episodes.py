"""``Tracker``: episodes open after `sustain`, grow while active, close after `close_after`."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health.episodes import Episode, Tracker


def feed(tracker, active, start=0):
    steps = np.arange(start, start + len(active))
    return tracker.feed(steps, np.asarray(active, dtype=bool))[0]


def test_opens_at_the_first_step_of_a_sustained_run_and_closes_after_a_clear_stretch():
    t = Tracker("k", sustain=3, close_after=4)
    assert feed(t, [0, 1, 1]) == []
    (change,) = feed(t, [1, 1, 0], start=3)
    assert (change.episode.first, change.episode.last, change.episode.open) == (1, 4, True)
    assert (change.lo, change.hi) == (0, 1)  # rows of this batch that belong to it
    assert feed(t, [0, 0], start=6) == []  # clear, not long enough
    closed, reopened = feed(t, [0, 0, 1, 1, 1], start=8)
    assert closed.episode.open is False and closed.episode.last == 4
    assert reopened.episode.first == 10  # a new episode, after `sustain` again
    assert reopened.episode.key == "k@10" != closed.episode.key


def test_gaps_shorter_than_close_after_keep_one_episode():
    t = Tracker("k", 1, close_after=3)
    changes = feed(t, [1, 0, 0, 1, 0, 1])
    assert len(changes) == 1 and (changes[0].episode.first, changes[0].episode.last) == (0, 5)


def test_stop_hands_back_control_at_each_transition():
    t = Tracker("k", 1, close_after=2)
    steps, active = np.arange(8), np.array([0, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    changes, used = t.feed(steps, active, stop=True)
    assert used == 2 and changes[0].episode.open  # opened at row 1
    changes, used = t.feed(steps[2:], active[2:], stop=True)
    assert used == 3 and not changes[0].episode.open  # closed at row 4


def test_starts_override_where_an_episode_begins():
    t = Tracker("k", 1, 10)
    (change,) = t.feed(np.array([100, 101]), np.array([False, True]), np.array([40, 50]))[0]
    assert change.episode.first == 50 and change.episode.key == "k@50"
    assert Episode("k", 3, 4, scope="l1").key == "k:l1@3"


@settings(max_examples=60, deadline=None)
@given(
    flags=st.lists(st.booleans(), max_size=120),
    cut=st.integers(1, 40),
    sustain=st.integers(1, 4),
    close_after=st.integers(1, 6),
)
def test_episodes_do_not_depend_on_how_the_observations_are_batched(
    flags, cut, sustain, close_after
):
    def episodes(chunk):
        t = Tracker("k", sustain, close_after)
        seen = {}
        for lo in range(0, len(flags), chunk):
            for change in feed(t, flags[lo : lo + chunk], start=lo):
                e = change.episode
                seen[e.first] = (e.first, e.last, e.open)
        return seen

    assert episodes(cut) == episodes(max(len(flags), 1))

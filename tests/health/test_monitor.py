"""``HealthMonitor``: dispatch to the rule list, episodes across flushes, bounded cost, replay."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health import HealthMonitor, Kind, diagnose
from gradguard.schema import HostBatch

from .series import NAN, batch, final, kinds, noisy, split

NAMES = ("a.weight", "b.weight")


def test_a_healthy_run_is_silent():
    loss = np.linspace(2.3, 0.4, 400) * np.exp(np.random.default_rng(0).normal(0, 0.05, 400))
    assert final(batch(noisy(0.5, 400), threshold=1.0, loss=loss, lr=1e-3), every=50) == []


def test_findings_come_sorted_by_their_first_step():
    norms = noisy(0.5, 200) + noisy(30.0, 50, seed=1)
    norms[40] = NAN
    found = HealthMonitor().update(batch(norms, loss=noisy(1.0, 250)))
    assert [f.steps[0] for f in found] == sorted(f.steps[0] for f in found)
    assert kinds(found)[:2] == ["nonfinite", "exploding"]


def test_an_episode_is_counted_and_warned_once_however_long_it_lasts():
    monitor = HealthMonitor()
    warned, reports = [], []
    for i in range(20):
        reports += monitor.update(
            batch(noisy(0.5, 50, seed=i), start=50 * i)
            if i < 4
            else batch(noisy(50.0, 50, seed=i), start=50 * i)
        )
        warned += monitor.to_warn
    assert monitor.counts == {Kind.EXPLODING: 1}
    assert len(warned) == 1 and warned[0].steps[0] == 200  # when it opened
    assert len(reports) == 16 and reports[-1].steps == (200, 999)


def _state_size(monitor):
    return len(pickle.dumps(monitor))


def _long_run(flushes, every=50):
    """A run with a fault of every kind the step rules know, repeated."""
    rng = np.random.default_rng(0)
    monitor = HealthMonitor()
    timings = []
    for i in range(flushes):
        norms = np.exp(rng.normal(np.log(0.5), 0.1, every))
        if i % 7 == 3:
            norms[10:40] *= 100  # an exploding episode
        if i % 11 == 5:
            norms[5] = NAN
        loss = np.exp(rng.normal(0, 0.05, every)) * (1.0 if i % 13 else 5.0)
        snaps = [(i * every, [float(norms[0]), 1e-12 if i % 5 else 0.1])]
        part = batch(
            norms.tolist(),
            start=i * every,
            loss=loss.tolist(),
            lr=1e-3,
            threshold=1.0,
            names=NAMES,
            snapshots=snaps,
        )
        t = time.perf_counter()
        monitor.update(part)
        timings.append(time.perf_counter() - t)
    return monitor, timings


def test_state_and_time_per_flush_do_not_grow_with_the_run():
    short, _ = _long_run(80)
    long, times = _long_run(800)
    assert abs(_state_size(long) - _state_size(short)) < 0.05 * _state_size(short)
    # the fastest flush of each window: robust to a machine busy with other work
    early, late = min(times[40:120]), min(times[-80:])
    assert late < 3 * early  # 40k steps in, a flush costs what it did at 2k


def test_diagnose_equals_the_final_state_of_an_online_run_and_accepts_numpy():
    series = noisy(0.5, 200) + noisy(30.0, 20, seed=1) + noisy(0.5, 150, seed=2)
    loss = np.linspace(2.0, 1.0, 370)
    online = final(batch(series, loss=loss), every=37)
    offline = diagnose({"total_norm": np.asarray(series), "loss": loss}, np.arange(370), chunk=50)
    assert [(f.key, f.steps, f.open) for f in offline] == [(f.key, f.steps, f.open) for f in online]
    assert "exploding" in kinds(offline)


@settings(max_examples=15, deadline=None)
@given(
    chunk=st.integers(7, 90),
    seed=st.integers(0, 10_000),
    bursts=st.lists(st.tuples(st.integers(0, 280), st.floats(1e-9, 1e3)), max_size=4),
    nans=st.lists(st.integers(0, 299), max_size=3),
)
def test_diagnose_is_independent_of_chunking(chunk, seed, bursts, nans):
    series = np.array(noisy(0.5, 300, seed=seed))
    for at, level in bursts:
        series[at : at + 6] = level
    series[nans] = NAN
    loss = np.linspace(2.0, 1.0, 300) * np.where(np.isnan(series), np.nan, 1.0)
    lr = np.where(np.arange(300) < 150, 1e-3, 1e-1)
    rows = [[series[s] * 1e-9, series[s]] for s in range(0, 300, 10)]
    args = (
        {"total_norm": series, "threshold": [2.0] * 300, "loss": loss, "lr": lr},
        range(300),
        NAMES,
        range(0, 300, 10),
        rows,
    )

    def key(f):
        return (f.key, f.steps, f.open, f.params, f.severity, f.message)

    assert [key(f) for f in diagnose(*args, chunk=chunk)] == [
        key(f) for f in diagnose(*args, chunk=1000)
    ]


def rare_events(seed, nans, overflows, n=400, scale=False):
    """A run's columns: noisy norms, NaN streaks (skipped or applied), AMP overflows
    on every other step of each ``(at, length)``, each halving the loss scale (``scale``)."""
    norm = np.array(noisy(0.5, n, seed=seed))
    skipped, reason = np.zeros(n), np.zeros(n)
    loss_scale = np.full(n, 65536.0)
    for at, length, skip in nans:
        norm[at : at + length] = NAN
        skipped[at : at + length], reason[at : at + length] = float(skip), 1.0 if skip else 0.0
    for at, length in overflows:
        every_other = np.arange(at, min(at + length, n), 2)
        skipped[every_other], reason[every_other] = 1.0, 3.0
        loss_scale[at:] /= 2.0 ** len(every_other)
    columns = {"total_norm": norm, "skipped": skipped, "reason": reason}
    if scale:
        columns["loss_scale"] = loss_scale
    columns["loss"] = np.linspace(2.0, 1.0, n)
    return columns


@settings(max_examples=60, deadline=None)
@given(
    chunk=st.sampled_from([1, 3, 17, 50]),
    seed=st.integers(0, 10_000),
    nans=st.lists(st.tuples(st.integers(0, 390), st.integers(1, 6), st.booleans()), max_size=4),
    overflows=st.lists(st.tuples(st.integers(0, 390), st.integers(1, 40)), max_size=3),
)
def test_rare_events_are_found_alike_however_the_run_is_chunked(chunk, seed, nans, overflows):
    """Non-finite streaks (skipped or applied) and AMP overflows, fed in small chunks
    (most of them clear, where the rules take their shortcuts) or in one batch, with the
    loss scale each overflow halves."""
    columns = rare_events(seed, nans, overflows, scale=True)
    n = len(columns["loss"])
    whole = diagnose(columns, range(n), chunk=1000)
    assert repr(diagnose(columns, range(n), chunk=chunk)) == repr(whole)  # NaN evidence too


@pytest.mark.parametrize("chunk", [1, 3, 17, 50])
@pytest.mark.parametrize(
    "overflows",
    [
        [(1, 15), (2, 1), (100, 3)],  # amp_overflow opens at step 102, its first overflow at 1
        [(0, 15), (1, 17)],  # the loss scale collapses, its fall (and overflows) from step 0
    ],
)
def test_episodes_that_began_in_an_earlier_chunk_keep_their_start(chunk, overflows):
    # the loss scale an amp_overflow episode began at, and the overflow skips since a
    # collapsing loss scale began to fall, were read only within the chunk that opened
    # the episode
    columns = rare_events(0, [], overflows, scale=True)
    n = len(columns["loss"])
    whole = diagnose(columns, range(n), chunk=1000)
    assert {f.kind for f in whole} & {"amp_overflow", "loss_scale_collapse"}
    assert repr(diagnose(columns, range(n), chunk=chunk)) == repr(whole)


def test_misaligned_input_is_refused_naming_the_column():
    with pytest.raises(ValueError, match="total_norm"):
        diagnose({"total_norm": [1.0, 2.0]}, [0, 1, 2])
    with pytest.raises(ValueError, match="tensor_steps"):
        diagnose({"total_norm": [1.0]}, [0], ("a",), [0, 1], [[1.0]])
    with pytest.raises(ValueError, match="chunk"):
        diagnose({"total_norm": [1.0]}, [0], chunk=0)
    with pytest.raises(ValueError, match="tensor_norms rows"):
        HealthMonitor().update(HostBatch([0], {"total_norm": [1.0]}, NAMES, [0], [[1.0]]))


def test_split_helper_keeps_snapshots_with_their_steps():
    parts = split(batch([1.0] * 10, names=("a",), snapshots=[(3, [1.0]), (7, [2.0])]), 5)
    assert [p.tensor_steps for p in parts] == [[3], [7]]


def test_findings_of_one_step_and_severity_come_in_the_same_order_however_chunked():
    # an applied NaN streak (run_lost, critical) where a collapsing loss scale
    # (loss_scale_collapse, critical) also begins: the order once depended on the chunk
    columns = rare_events(0, [(290, 5, False)], [(0, 1), (291, 31)], scale=True)
    n = len(columns["loss"])
    whole = diagnose(columns, range(n), chunk=1000)
    assert [f.kind for f in whole if f.steps[0] == 290] == [
        "loss_scale_collapse",
        "nonfinite",
        "run_lost",
    ]
    assert repr(diagnose(columns, range(n), chunk=1)) == repr(whole)


def test_a_nan_step_inside_a_vanishing_episode_leaves_its_lowest_norm_alike_however_chunked():
    series = np.array(noisy(0.5, 300, seed=0))
    series[0:8] = 1e-8  # vanishing from the first step ...
    series[5] = NAN  # ... with a NaN step inside the episode
    columns = {"total_norm": series, "loss": np.linspace(2.0, 1.0, 300)}
    whole = diagnose(columns, range(300), chunk=1000)
    (vanishing,) = [f for f in whole if f.kind == "vanishing"]
    assert vanishing.evidence["min_norm"] == pytest.approx(1e-8)
    assert repr(diagnose(columns, range(300), chunk=7)) == repr(whole)

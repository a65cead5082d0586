"""RunStore: round trip, bad files, concurrent reads (more in test_runs, test_files)."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradguard.record import STEP_COLUMNS, Event, Recorder, RunStore, SkipReason, StoreError
from gradguard.record.store import SCHEMA_VERSION
from tests.record.fake_steps import NAMES, env, expected, norms, run_steps


def test_round_trip_preserves_values_nan_and_inf(tmp_path):
    rec = Recorder(tmp_path / "run", log_every=4, tensor_every=3, config={"lr": 1e-3})
    rec.start(NAMES, [(2,)] * len(NAMES))
    recorded = run_steps(rec, range(11))  # 11 steps: 2 full intervals + 3 flushed at close
    rec.event(Event(5, "skip", "non-finite gradient", {"names": ["head.bias"]}))
    rec.close()

    store = RunStore.open(tmp_path / "run")
    meta = store.meta()
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["config"]["lr"] == 1e-3
    assert meta["torch_version"] == torch.__version__
    assert meta["shapes"] == [[2]] * len(NAMES)
    assert store.names() == NAMES

    data = store.steps()
    assert set(data) == {"step", *STEP_COLUMNS}
    np.testing.assert_array_equal(data["step"], np.arange(11))
    for column in STEP_COLUMNS:
        want = np.array([expected(recorded[s], column) for s in range(11)])
        got = data[column].astype(np.float64)
        if column in ("total_norm", "clipped_norm", "clip_coef"):
            want = want.astype(np.float32).astype(np.float64)  # recorded in float32
        np.testing.assert_array_equal(got, want, err_msg=column)
    assert math.isnan(data["total_norm"][5]) and math.isinf(data["total_norm"][6])
    assert data["skipped"].tolist() == [s in (5, 6) for s in range(11)]
    assert data["reason"][5] == SkipReason.NONFINITE

    steps, names, stored = store.tensor_norms()
    np.testing.assert_array_equal(steps, [0, 3, 6, 9])
    assert names == NAMES and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, np.stack([norms(s).numpy() for s in steps]))
    assert np.isinf(stored[2, 1])

    assert store.events() == [Event(5, "skip", "non-finite gradient", {"names": ["head.bias"]})]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"gradguard\[pandas\]"):
            store.to_pandas()
    else:
        frame = store.to_pandas()
        assert list(frame.index) == list(range(11)) and "loss" in frame.columns
    store.close()


@pytest.mark.parametrize("content", ["random", "foreign", "newer"])
def test_bad_files_raise_store_error_and_stay_unchanged(tmp_path, content):
    path = tmp_path / "gradguard.db"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        conn = sqlite3.connect(path)
        if content == "foreign":
            conn.execute("CREATE TABLE users (id INTEGER, name TEXT)")
        else:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            newer = str(SCHEMA_VERSION + 1)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (newer,))
        conn.commit()
        conn.close()
    before = path.read_bytes()
    message = {"random": "not an SQLite", "foreign": "not a gradguard", "newer": "newer"}[content]
    with pytest.raises(StoreError, match=message) as info:
        RunStore.open(path)
    assert str(path) in str(info.value)
    with pytest.raises(StoreError, match=message):
        RunStore(path).start(NAMES)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradguard.db"]


def test_missing_store_raises(tmp_path):
    with pytest.raises(StoreError, match="nothing' does not exist"):
        RunStore.open(tmp_path / "nothing")
    with pytest.raises(StoreError, match="no gradguard run store at"):
        RunStore.open(tmp_path)  # a directory without a store


def test_read_while_writing(tmp_path):
    rec = Recorder(tmp_path, log_every=5)
    rec.start(NAMES)
    run_steps(rec, range(10))
    rec.drain()  # flushed batches are written on the recorder's writer thread
    reader = RunStore.open(tmp_path)
    assert len(reader.steps()["step"]) == 10
    run_steps(rec, range(10, 17))  # 15 flushed, 2 buffered
    rec.drain()
    np.testing.assert_array_equal(reader.steps()["step"], np.arange(15))
    assert len(reader.tensor_norms()[0]) == 3  # steps 0, 5, 10
    rec.close()
    assert len(reader.steps()["step"]) == 17
    reader.close()


def test_reader_in_another_process(tmp_path):
    rec = Recorder(tmp_path, log_every=4)
    run_steps(rec, range(8))
    rec.drain()
    code = (
        "import sys; from gradguard.record import RunStore; "
        "print(len(RunStore.open(sys.argv[1]).steps()['step']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=env(),
    )
    assert out.stdout.strip() == "8"
    rec.close()


def _episode(step: int, end: int, ongoing: bool, key: str = "health.exploding@40") -> Event:
    return Event(step, "health.exploding", f"norm high {step}-{end}", {"n": end}, end, key, ongoing)


def test_an_episode_is_one_event_updated_in_place(tmp_path):
    with Recorder(tmp_path, log_every=2) as rec:
        rec.start(NAMES)
        run_steps(rec, range(2))
        for end, ongoing in ((41, True), (45, True), (52, False)):
            rec.event(_episode(40, end, ongoing))
            rec.event(Event(end, "skip", "a point event is never merged"))
            rec.flush()
            rec.drain()
            with RunStore.open(tmp_path) as reader:
                (found,) = reader.events(kind="health.exploding")
            assert (found.end_step, found.ongoing, found.data) == (end, ongoing, {"n": end})
    with Recorder(tmp_path) as rec:  # the same key in another run is another episode
        rec.start(NAMES)
        rec.event(_episode(3, 4, True))
    with RunStore.open(tmp_path, run=1) as store:
        assert store.events(kind="health.exploding") == [_episode(40, 52, False)]
        assert len(store.events(kind="skip")) == 3
    with RunStore.open(tmp_path) as store:
        assert store.events() == [_episode(3, 4, True)]

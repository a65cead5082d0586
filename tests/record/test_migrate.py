"""Schema v1 stores: read as run 1 without a write, migrated in place by the first writer."""

from __future__ import annotations

import json
import sqlite3
import struct

import numpy as np
import pytest

from gradguard.record import Event, RunStore, StoreError, _migrate
from tests.record.fake_steps import NAMES

# The v1 layout as gradguard wrote it before run identity
# (git show c98b0f7:src/gradguard/record/store.py)
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,
    total_norm REAL, clipped_norm REAL, clip_coef REAL, threshold REAL, clipped INTEGER,
    skipped INTEGER, reason INTEGER, loss REAL, lr REAL, loss_scale REAL
);
CREATE TABLE IF NOT EXISTS tensor_norms (step INTEGER PRIMARY KEY, norms BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_step ON events (step);
"""
V1_META = {
    "schema_version": 1,
    "config": {"lr": 0.01, "log_every": 5},
    "names": list(NAMES),
    "shapes": [[4, 3], [3], [1]],
    "gradguard_version": "0.1.0",
    "torch_version": "2.13.0",
    "python_version": "3.11.7",
    "created": "2026-01-02T03:04:05+00:00",
}


def write_v1(path, steps: int = 25) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    with conn:
        conn.executescript(V1_SCHEMA)
        conn.executemany(
            "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in V1_META.items()]
        )
        conn.executemany(
            "INSERT INTO steps VALUES (?, ?, ?, ?, 1.0, ?, ?, ?, ?, 0.01, NULL)",
            [
                (s, s * 0.5, min(s * 0.5, 1.0), min(1.0, 2 / max(s, 1e-9)), int(s > 2), *flags)
                for s in range(steps)
                for flags in [(int(s == 7), int(s == 7), 3.0 - s * 0.1)]
            ],
        )
        conn.executemany(
            "INSERT INTO tensor_norms VALUES (?, ?)",
            [(s, struct.pack("<3f", s, s + 0.5, float("inf"))) for s in range(0, steps, 5)],
        )
        conn.execute(
            "INSERT INTO events (step, kind, message, data) VALUES "
            "(7, 'skip', 'step 7 skipped', '{\"reason\": \"nonfinite\"}')"
        )
    conn.close()


def _snapshot(store: RunStore) -> tuple:
    steps = store.steps()
    tensor_steps, names, norms = store.tensor_norms()
    return steps, tensor_steps, names, norms, store.events()


def test_a_v1_store_reads_as_run_1_without_being_written(tmp_path):
    path = tmp_path / "gradguard.db"
    write_v1(path)
    before = path.read_bytes()
    with RunStore.open(tmp_path) as store:
        steps, tensor_steps, names, norms, events = _snapshot(store)
        meta = store.meta()
        runs = store.runs()
    assert path.read_bytes() == before
    np.testing.assert_array_equal(steps["step"], np.arange(25))
    assert steps["skipped"].tolist() == [s == 7 for s in range(25)]
    np.testing.assert_array_equal(tensor_steps, np.arange(0, 25, 5))
    assert names == NAMES and np.isinf(norms[:, 2]).all()
    assert events == [Event(7, "skip", "step 7 skipped", {"reason": "nonfinite"})]
    assert meta["schema_version"] == 1 and meta["run"] == 1
    assert meta["config"] == V1_META["config"] and meta["shapes"] == V1_META["shapes"]
    assert [(r.run, r.steps, r.started) for r in runs] == [(1, 25, V1_META["created"])]


def test_the_first_writer_migrates_in_place_without_loss(tmp_path):
    path = tmp_path / "gradguard.db"
    write_v1(path)
    with RunStore.open(tmp_path) as store:
        before = _snapshot(store)
    writer = RunStore(tmp_path)
    writer.start(NAMES, {"lr": 0.1})
    assert writer.run == 2
    writer.close()
    with RunStore.open(tmp_path, run=1) as store:
        after = _snapshot(store)
        meta = store.meta()
    for column, values in before[0].items():
        np.testing.assert_array_equal(after[0][column], values, err_msg=column)
    for old, new in zip(before[1:], after[1:]):
        if isinstance(old, np.ndarray):
            np.testing.assert_array_equal(new, old)
        else:
            assert new == old
    assert meta["schema_version"] == 2 and "migrated_from_v1" in meta
    assert meta["config"] == V1_META["config"] and meta["torch_version"] == "2.13.0"
    assert meta["created"] == V1_META["created"]
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert not any(t.startswith("v1_") for t in tables)


def test_a_failed_migration_leaves_the_v1_store_readable(tmp_path, monkeypatch):
    path = tmp_path / "gradguard.db"
    write_v1(path)
    with RunStore.open(tmp_path) as store:
        before = store.steps()

    def fail_half_way(conn, meta):
        conn.execute("ALTER TABLE steps RENAME TO v1_steps")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(_migrate, "_copy_v1", fail_half_way)
    with pytest.raises(StoreError, match="migrating"):
        RunStore(tmp_path).start(NAMES)
    with RunStore.open(tmp_path) as store:
        assert store.meta()["schema_version"] == 1
        np.testing.assert_array_equal(store.steps()["total_norm"], before["total_norm"])

"""Reading a run for the report: layers per module, findings as episodes, replay policy."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from gradguard.health import Finding, Kind, Severity
from gradguard.record.store import RunStore, StoreError
from gradguard.report import load_run
from gradguard.report.data import REPLAY_MAX_STEPS, group_layers, stored_findings, wall_seconds
from gradguard.schema import Event
from tests.report.runs import write_synthetic


def test_group_layers_combines_tensors_per_module_in_model_order():
    names = ("b.weight", "b.bias", "a.weight", "c")
    norms = np.array([[3.0, 4.0, 1.0, 2.0]])
    layers, grouped = group_layers(names, norms)
    assert layers == ("b", "a", "c")
    assert grouped.tolist() == [[5.0, 1.0, 2.0]]


def test_group_layers_is_the_l2_norm_of_members_for_many_interleaved_tensors():
    rng = np.random.default_rng(0)
    names = tuple(f"m{i % 7}.p{i}" for i in range(50))
    norms = rng.uniform(0, 2, (4, 50))
    layers, grouped = group_layers(names, norms)
    assert layers == tuple(f"m{i}" for i in range(7))
    for j in range(7):
        want = np.sqrt((norms[:, [i for i in range(50) if i % 7 == j]] ** 2).sum(1))
        np.testing.assert_allclose(grouped[:, j], want)


def _finding(start: int, end: int) -> Finding:
    return Finding(Kind.EXPLODING, Severity.CRITICAL, (start, start), ("a.weight",), {}, (), "x")


def test_a_stored_episode_takes_its_range_from_end_step():
    event = _finding(40, 40).to_event()
    episode = Event(event.step, event.kind, event.message, event.data, end_step=90, key="k")
    (finding,) = stored_findings([episode])
    assert finding.steps == (40, 90)
    (point,) = stored_findings([event])
    assert point.steps == (40, 40)


def test_malformed_finding_events_are_skipped():
    events = [Event(3, "health.no_such_kind", "?", {}), Event(4, "health.spike", "?", {"steps": 1})]
    assert stored_findings(events) == []


def test_runs_with_live_findings_are_not_replayed(tmp_path):
    names = ["a.weight", "b.weight"]
    write_synthetic(tmp_path / "run", 300, names, every=10, batch=300)
    replayed = load_run(tmp_path / "run")  # no live findings, short: the rules replay
    assert replayed.findings and replayed.findings_replayed
    store = RunStore(tmp_path / "run", resume="latest")  # add to the same run
    store.start(names)
    stored = Finding(Kind.LOSS_STALL, Severity.WARNING, (40, 90), (), {}, (), "stall")
    store.write_events([stored.to_event()])
    store.close()
    live = load_run(tmp_path / "run")
    assert [f.message for f in live.findings] == ["stall"] and not live.findings_replayed
    both = load_run(tmp_path / "run", rules=True)
    assert len(both.findings) == len(replayed.findings) + 1
    assert load_run(tmp_path / "run", rules=False).findings == live.findings


def test_long_runs_are_not_replayed_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr("gradguard.report.data.REPLAY_MAX_STEPS", 100)
    write_synthetic(tmp_path / "run", 300, ["a.weight"], every=10, batch=300)
    assert load_run(tmp_path / "run").findings == []
    assert load_run(tmp_path / "run", rules=True).findings
    assert REPLAY_MAX_STEPS >= 100_000


def test_wall_seconds_span_creation_to_the_last_write(tmp_path):
    write_synthetic(tmp_path / "run", 50, ["a.weight"], every=10, batch=50)
    db = tmp_path / "run" / "gradguard.db"
    with RunStore.open(tmp_path / "run") as store:
        meta = store.meta()
    created = __import__("datetime").datetime.fromisoformat(meta["created"]).timestamp()
    os.utime(db, (created + 42.0, created + 42.0))
    assert wall_seconds(meta, db) == pytest.approx(42.0, abs=1e-3)
    assert math.isnan(wall_seconds({}, db))


def test_missing_run_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        load_run(tmp_path / "nope")

"""Recorder + RunStore: round trip, host transfers, fault tolerance, bad files, concurrent reads."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from gradguard import measure
from gradguard.record import (
    STEP_COLUMNS,
    Event,
    HostBatch,
    Recorder,
    RunStore,
    SkipReason,
    StoreError,
)
from gradguard.record.store import SCHEMA_VERSION

NAMES = ("embed.weight", "block.0.attn.weight", "head.bias")


def _step_values(step: int) -> dict:
    """Deterministic, varied per-step values, some NaN/inf, as device tensors and numbers."""
    g = torch.Generator().manual_seed(step)
    total = torch.rand((), generator=g) * 10
    if step == 5:
        total = torch.tensor(float("nan"))
    if step == 6:
        total = torch.tensor(float("inf"))
    coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    skipped = bool(step in (5, 6))
    return dict(
        total_norm=total,
        clipped_norm=total * coef,
        clip_coef=coef,
        threshold=1.0,
        skipped=torch.tensor(skipped),
        reason=torch.tensor(int(SkipReason.NONFINITE) if skipped else 0),
        loss=torch.tensor(2.0 - step * 0.01, dtype=torch.float64),
        lr=1e-3 * (step + 1),
    )


def _norms(step: int) -> torch.Tensor:
    base = torch.arange(1, len(NAMES) + 1, dtype=torch.float32) * (step + 1) * 0.125
    if step == 6:
        base[1] = float("inf")
    return base


class _Stats:
    """A GradStats stand-in carrying only what the Recorder reads."""

    def __init__(self, norms: torch.Tensor) -> None:
        self.norms = norms
        self.names = NAMES
        self.shapes = tuple(torch.Size([2]) for _ in NAMES)

    def labels(self) -> tuple[str, ...]:
        return NAMES


def _run(recorder: Recorder, steps: range) -> dict[int, dict]:
    recorded = {}
    for s in steps:
        values = _step_values(s)
        stats = _Stats(_norms(s)) if recorder.wants_tensor_norms(s) else None
        recorder.record(s, stats=stats, **values)
        recorded[s] = values
    return recorded


def _expected(values: dict, column: str) -> float:
    if column == "clipped":
        return float(values["clip_coef"] < 1)
    v = values.get(column)
    if v is None:
        return math.nan
    return float(v)


def test_round_trip_preserves_values_nan_and_inf(tmp_path):
    rec = Recorder(tmp_path / "run", log_every=4, tensor_every=3, config={"lr": 1e-3})
    rec.start(NAMES, [(2,)] * len(NAMES))
    recorded = _run(rec, range(11))  # 11 steps: 2 full intervals + 3 flushed at close
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
        want = np.array([_expected(recorded[s], column) for s in range(11)])
        got = data[column].astype(np.float64)
        if column in ("total_norm", "clipped_norm", "clip_coef"):
            want = want.astype(np.float32).astype(np.float64)  # recorded in float32
        np.testing.assert_array_equal(got, want, err_msg=column)
    assert math.isnan(data["total_norm"][5]) and math.isinf(data["total_norm"][6])
    assert data["skipped"].tolist() == [s in (5, 6) for s in range(11)]
    assert data["reason"][5] == SkipReason.NONFINITE

    steps, names, norms = store.tensor_norms()
    np.testing.assert_array_equal(steps, [0, 3, 6, 9])
    assert names == NAMES and norms.dtype == np.float32
    np.testing.assert_array_equal(norms, np.stack([_norms(s).numpy() for s in steps]))
    assert np.isinf(norms[2, 1])

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


def test_host_transfer_only_at_log_steps(tmp_path, monkeypatch):
    calls = []
    for name in ("cpu", "tolist", "item", "numpy", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=original, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    rec = Recorder(tmp_path, log_every=5)
    rec.start(NAMES)
    for s in range(14):
        values = _step_values(s)
        calls.clear()
        stats = _Stats(_norms(s)) if rec.wants_tensor_norms(s) else None
        batch = rec.record(s, stats=stats, **values)
        if (s + 1) % 5 == 0:
            assert isinstance(batch, HostBatch) and batch.steps == list(range(s - 4, s + 1))
            assert calls.count("cpu") == 1, calls  # the whole interval in one transfer
        else:
            assert batch is None
            assert calls == [], f"step {s} touched the host: {calls}"
    assert rec.transfers == 2
    rec.close()
    assert rec.transfers == 3


def test_in_place_updates_after_record_do_not_change_history(tmp_path):
    rec = Recorder(tmp_path, log_every=10)
    threshold = torch.tensor(1.0)
    for s in range(3):
        rec.record(
            s,
            total_norm=threshold * 2,
            clipped_norm=threshold,
            clip_coef=0.5,
            threshold=threshold,
            skipped=False,
            reason=0,
        )
        threshold.add_(1.0)  # a policy state updated in place
    batch = rec.flush()
    assert batch.columns["threshold"] == [1.0, 2.0, 3.0]
    assert batch.absent == frozenset({"loss", "lr", "loss_scale"})
    rec.close()


def test_with_real_grad_stats(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model(torch.randn(8, 4)).pow(2).mean().backward()
    stats = measure(model.named_parameters())
    with Recorder(tmp_path, log_every=2) as rec:
        rec.record(
            0,
            total_norm=stats.total_norm,
            clipped_norm=stats.total_norm,
            clip_coef=1.0,
            threshold=float("inf"),
            skipped=False,
            reason=0,
            stats=stats,
        )
    store = RunStore.open(tmp_path)
    _, names, norms = store.tensor_norms()
    assert names == stats.labels()
    np.testing.assert_allclose(norms[0], stats.norms.numpy(), rtol=1e-6)
    store.close()


def test_listener_events_and_sink_failure_isolated(tmp_path):
    seen: list[HostBatch] = []

    class Broken:
        def start(self, names, config):
            pass

        def write(self, batch):
            raise OSError("disk full")

        def write_events(self, events):
            raise AssertionError("a disabled sink must not be called again")

        def close(self):
            pass

    class Collect:
        def __init__(self):
            self.batches, self.events, self.closed = [], [], False

        def start(self, names, config):
            self.names = tuple(names)

        def write(self, batch):
            self.batches.append(batch)

        def write_events(self, events):
            self.events.extend(events)

        def close(self):
            self.closed = True

    def monitor(batch):
        seen.append(batch)
        return [Event(batch.steps[-1], "finding", "norm high")]

    good = Collect()
    rec = Recorder(tmp_path, sinks=[Broken(), good], log_every=3)
    rec.add_listener(monitor)
    with pytest.warns(RuntimeWarning, match=r"Broken.*disk full") as caught:
        _run(rec, range(9))
    assert len([w for w in caught if "Broken" in str(w.message)]) == 1
    rec.close()
    assert [b.steps[0] for b in good.batches] == [0, 3, 6] and good.closed
    assert [e.step for e in good.events] == [2, 5, 8]
    assert len(seen) == 3
    store = RunStore.open(tmp_path)
    assert [e.kind for e in store.events()] == ["finding"] * 3
    store.close()


def test_unwritable_store_warns_once_and_recording_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = Recorder(blocker / "sub" / "gradguard.db", log_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.start(NAMES)
        _run(rec, range(7))
        rec.close()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "RunStore" in str(runtime[0].message) and "sub" in str(runtime[0].message)
    assert blocker.read_text() == "not a directory"


def test_non_zero_rank_records_nothing(tmp_path):
    rec = Recorder(tmp_path / "r1", rank=1, log_every=1)
    rec.start(NAMES)
    assert not rec.wants_tensor_norms(0)
    assert rec.record(0, **_step_values(0)) is None
    rec.close()
    assert not (tmp_path / "r1").exists()


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
    with pytest.raises(StoreError, match="no gradguard run store"):
        RunStore.open(tmp_path / "nothing")


def test_read_while_writing(tmp_path):
    rec = Recorder(tmp_path, log_every=5)
    rec.start(NAMES)
    _run(rec, range(10))
    rec.drain()  # flushed batches are written on the recorder's writer thread
    reader = RunStore.open(tmp_path)
    assert len(reader.steps()["step"]) == 10
    _run(rec, range(10, 17))  # 15 flushed, 2 buffered
    rec.drain()
    np.testing.assert_array_equal(reader.steps()["step"], np.arange(15))
    assert len(reader.tensor_norms()[0]) == 3  # steps 0, 5, 10
    rec.close()
    assert len(reader.steps()["step"]) == 17
    reader.close()


def test_reader_in_another_process(tmp_path):
    rec = Recorder(tmp_path, log_every=4)
    _run(rec, range(8))
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
        env=_env(),
    )
    assert out.stdout.strip() == "8"
    rec.close()


def test_reopening_appends(tmp_path):
    with Recorder(tmp_path, log_every=3) as rec:
        rec.start(NAMES)
        _run(rec, range(4))
    with Recorder(tmp_path, log_every=3) as rec:
        rec.start(NAMES)
        _run(rec, range(4, 6))
    store = RunStore.open(tmp_path)
    np.testing.assert_array_equal(store.steps()["step"], np.arange(6))
    assert "resumed" in store.meta()
    store.close()
    with pytest.raises(StoreError, match="different parameter names"):
        RunStore(tmp_path).start(("other",))


def test_arguments_validated():
    with pytest.raises(ValueError, match="log_every"):
        Recorder(False, log_every=0)
    with pytest.raises(ValueError, match="tensor_every"):
        Recorder(False, tensor_every=-1)


def test_importing_gradguard_imports_no_backend():
    code = (
        "import sys, gradguard, gradguard.record, gradguard.record.sinks; "
        "names = ('tensorboard', 'wandb', 'mlflow', 'rich', 'pandas'); "
        "print([m for m in names if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert out.stdout.strip() == "[]"


def _env() -> dict:
    import os
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_round_trip_through_pinned_transfer(tmp_path):
    rec = Recorder(tmp_path, log_every=4, tensor_every=2)
    rec.start(NAMES)
    for s in range(4):
        values = {
            k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _step_values(s).items()
        }
        stats = _Stats(_norms(s).cuda()) if rec.wants_tensor_norms(s) else None
        batch = rec.record(s, stats=stats, **values)
    assert rec.transfers == 1 and batch is not None
    rec.close()
    store = RunStore.open(tmp_path)
    want = [float(_step_values(s)["total_norm"]) for s in range(4)]
    np.testing.assert_allclose(store.steps()["total_norm"], want, rtol=1e-6)
    np.testing.assert_array_equal(store.tensor_norms()[2][1], _norms(2).numpy())
    store.close()


def test_slow_sink_does_not_stall_recording(tmp_path):
    release, entered = threading.Event(), threading.Event()

    class SlowSink:
        def __init__(self):
            self.written = []

        def start(self, names, config):
            pass

        def write(self, batch):
            entered.set()
            release.wait(10)
            self.written.append(list(batch.steps))

        def write_events(self, events):
            pass

        def close(self):
            pass

    sink = SlowSink()
    rec = Recorder(tmp_path, sinks=[sink], log_every=2)
    rec.start(NAMES)
    _run(rec, range(2))  # flush: handed to the writer, which blocks in the sink
    assert entered.wait(10)
    _run(rec, range(2, 3))  # recording goes on while the sink is stuck
    assert sink.written == []
    release.set()
    rec.close()
    assert sink.written == [[0, 1], [2]]
    assert RunStore.open(tmp_path).steps()["step"].tolist() == [0, 1, 2]


def test_inline_writer_writes_before_flush_returns(tmp_path):
    rec = Recorder(tmp_path, log_every=3, background=False)
    rec.start(NAMES)
    _run(rec, range(3))
    assert RunStore.open(tmp_path).steps()["step"].tolist() == [0, 1, 2]
    rec.close()

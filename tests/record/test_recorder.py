"""Recorder: host transfers, snapshots, fault isolation, writer thread."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from gradguard import measure
from gradguard.record import Event, HostBatch, Recorder, RunStore
from tests.record.fake_steps import NAMES, FakeStats, env, norms, run_steps, step_values


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
        values = step_values(s)
        calls.clear()
        stats = FakeStats(norms(s)) if rec.wants_tensor_norms(s) else None
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
        run_steps(rec, range(9))
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
        run_steps(rec, range(7))
        rec.close()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "RunStore" in str(runtime[0].message) and "sub" in str(runtime[0].message)
    assert blocker.read_text() == "not a directory"


def test_non_zero_rank_records_nothing(tmp_path):
    rec = Recorder(tmp_path / "r1", rank=1, log_every=1)
    rec.start(NAMES)
    assert not rec.wants_tensor_norms(0)
    assert rec.record(0, **step_values(0)) is None
    rec.close()
    assert not (tmp_path / "r1").exists()


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
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env()
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_round_trip_through_pinned_transfer(tmp_path):
    rec = Recorder(tmp_path, log_every=4, tensor_every=2)
    rec.start(NAMES)
    for s in range(4):
        values = {
            k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in step_values(s).items()
        }
        stats = FakeStats(norms(s).cuda()) if rec.wants_tensor_norms(s) else None
        batch = rec.record(s, stats=stats, **values)
    assert rec.transfers == 1 and batch is not None
    rec.close()
    store = RunStore.open(tmp_path)
    want = [float(step_values(s)["total_norm"]) for s in range(4)]
    np.testing.assert_allclose(store.steps()["total_norm"], want, rtol=1e-6)
    np.testing.assert_array_equal(store.tensor_norms()[2][1], norms(2).numpy())
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
    run_steps(rec, range(2))  # flush: handed to the writer, which blocks in the sink
    assert entered.wait(10)
    run_steps(rec, range(2, 3))  # recording goes on while the sink is stuck
    assert sink.written == []
    release.set()
    rec.close()
    assert sink.written == [[0, 1], [2]]
    assert RunStore.open(tmp_path).steps()["step"].tolist() == [0, 1, 2]


def test_inline_writer_writes_before_flush_returns(tmp_path):
    rec = Recorder(tmp_path, log_every=3, background=False)
    rec.start(NAMES)
    run_steps(rec, range(3))
    assert RunStore.open(tmp_path).steps()["step"].tolist() == [0, 1, 2]
    rec.close()


def test_nonfinite_steps_are_snapshotted_whole_without_a_host_sync(tmp_path, no_host_sync):
    rec = Recorder(tmp_path, log_every=5, tensor_every=5)
    rec.start(NAMES)
    batches = []
    for s in range(10):  # steps 5 (NaN total) and 6 (inf) are non-finite
        values = step_values(s)
        with no_host_sync() if s % 5 != 4 else contextlib.nullcontext():
            batch = rec.record(s, stats=FakeStats(norms(s)), **values)
        if batch is not None:
            batches.append(batch)
    assert [b.tensor_steps for b in batches] == [[0], [5, 6]]
    assert [b.extra_tensor_steps for b in batches] == [frozenset(), frozenset({6})]
    assert batches[1].tensor_norms[1] == norms(6).tolist()
    assert rec.transfers == 3  # one per flush, one more in the interval with step 6
    rec.close()
    with RunStore.open(tmp_path) as store:
        assert store.tensor_norms(extra=True)[0].tolist() == [6]
        assert store.tensor_norms(extra=False)[0].tolist() == [0, 5]
        assert np.isinf(store.tensor_norms()[2][2, 1])


def test_a_sink_failing_on_the_writer_thread_warns_at_the_users_line(tmp_path):
    class Broken:
        def start(self, names, config):
            pass

        def write(self, batch):
            raise OSError("remote server gone")

        def write_events(self, events):
            pass

        def close(self):
            pass

    rec = Recorder(False, sinks=[Broken()], log_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_steps(rec, range(2))
        rec.drain()
        assert caught == []  # decided on the writer thread: deferred
        run_steps(rec, range(2, 8))
        rec.close()
    (warning,) = [w for w in caught if "remote server gone" in str(w.message)]
    assert warning.filename.endswith("fake_steps.py")  # the line that called record()


def test_every_value_path_reads_back_the_same(tmp_path):
    """Rows in the preallocated buffer, rows past its 512, values that need their own
    copy (one requires grad; one is a 1-element 1-d tensor) all round-trip exactly."""
    rec = Recorder(tmp_path, log_every=600)
    weight = torch.tensor(2.0, requires_grad=True)
    for s in range(600):
        loss = weight * s if s % 7 == 0 else torch.tensor(float(s))  # some steps carry a graph
        rec.record(
            s,
            total_norm=torch.tensor([s + 0.5]),
            clipped_norm=torch.tensor(s, dtype=torch.float64),
            clip_coef=1.0,
            threshold=torch.tensor(float("inf")),
            skipped=torch.tensor(s % 3 == 0),
            reason=torch.tensor(s % 4, dtype=torch.int8),
            loss=loss,
        )
    rec.close()
    with RunStore.open(tmp_path) as store:
        steps = store.steps()
    s = np.arange(600)
    np.testing.assert_array_equal(steps["total_norm"], s + 0.5)
    np.testing.assert_array_equal(steps["clipped_norm"], s)
    np.testing.assert_array_equal(steps["loss"], np.where(s % 7 == 0, 2.0 * s, s))
    np.testing.assert_array_equal(steps["skipped"], s % 3 == 0)
    np.testing.assert_array_equal(steps["reason"], s % 4)
    assert np.isinf(steps["threshold"]).all()

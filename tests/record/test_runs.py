"""Run identity: a run directory holds runs and never loses one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gradguard import Guard
from gradguard.record import Recorder, RunStore, StoreError
from tests.record.fake_steps import NAMES, env, run_steps


def _record(path, steps: range, resume=None, names=NAMES, log_every: int = 4) -> int:
    with Recorder(path, log_every=log_every, resume=resume) as rec:
        rec.start(names)
        run_steps(rec, steps)
        return rec.run


def test_a_second_start_opens_a_new_run_and_loses_nothing(tmp_path):
    first = _record(tmp_path, range(60))
    with RunStore.open(tmp_path) as store:
        before = store.steps()
    second = _record(tmp_path, range(30))  # the same script run again
    assert (first, second) == (1, 2)
    with RunStore.open(tmp_path) as latest:
        assert latest.run == 2
        np.testing.assert_array_equal(latest.steps()["step"], np.arange(30))
        runs = latest.runs()
    assert [(r.run, r.steps, r.last_step, r.status) for r in runs] == [
        (1, 60, 59, "closed"),
        (2, 30, 29, "closed"),
    ]
    assert runs[0].names == NAMES and runs[0].pid == os.getpid() and runs[0].ended
    with RunStore.open(tmp_path, run=1) as old:
        after = old.steps()
        assert old.meta()["run"] == 1 and old.meta()["names"] == list(NAMES)
    for column, values in before.items():
        np.testing.assert_array_equal(after[column], values, err_msg=column)


def test_resume_continues_a_run_and_replaces_its_abandoned_steps(tmp_path):
    _record(tmp_path, range(40))  # run 1 reached step 39, then crashed
    _record(tmp_path, range(10))  # run 2: another experiment
    assert _record(tmp_path, range(24, 30), resume=1) == 1  # from the checkpoint at 24
    with RunStore.open(tmp_path, run=1) as store:
        np.testing.assert_array_equal(store.steps()["step"], np.arange(30))
        snapshots = store.tensor_norms()[0]
        assert store.info().resumed and store.info().status == "closed"
    assert snapshots.max() < 30  # the old trajectory's snapshots past 24 went too
    assert _record(tmp_path, range(30, 34), resume="latest") == 2
    with RunStore.open(tmp_path) as store:
        np.testing.assert_array_equal(store.steps()["step"], [*range(10), *range(30, 34)])
        assert len(store.runs()) == 2


def test_resume_errors_name_the_problem(tmp_path):
    _record(tmp_path, range(4))
    with pytest.raises(StoreError, match=r"no run 7 \(runs: 1\)"):
        RunStore(tmp_path, resume=7).start(NAMES)
    with pytest.raises(StoreError, match="different parameter names"):
        RunStore(tmp_path, resume=1).start(("other.weight",))
    for bad in (0, -1, "first", 1.5, True):
        with pytest.raises(ValueError, match="resume"):
            Recorder(tmp_path, resume=bad)
    assert RunStore(tmp_path, resume=np.int64(1)).resume == 1
    with pytest.raises(StoreError, match="no run 3"):
        RunStore.open(tmp_path, run=3)
    assert _record(tmp_path / "fresh", range(2), resume="latest") == 1  # nothing to resume


def test_resuming_a_run_that_is_being_written_is_refused(tmp_path):
    rec = Recorder(tmp_path, log_every=2)
    rec.start(NAMES)
    with pytest.raises(StoreError, match=f"being written by process {os.getpid()}"):
        RunStore(tmp_path, resume=1).start(NAMES)
    rec.close()
    assert _record(tmp_path, range(2), resume=1) == 1  # closed: resumable


def test_two_recorders_in_one_process_write_separate_runs(tmp_path):
    a, b = Recorder(tmp_path, log_every=3), Recorder(tmp_path, log_every=5)
    a.start(NAMES)
    b.start(("other.weight",))
    for step in range(50):
        for rec, scale in ((a, 1.0), (b, 2.0)):
            rec.record(
                step,
                total_norm=torch.tensor(scale * step),
                clipped_norm=scale * step,
                clip_coef=1.0,
                threshold=float("inf"),
                skipped=False,
                reason=0,
            )
    a.close()
    b.close()
    for run, scale, names in ((a.run, 1.0, NAMES), (b.run, 2.0, ("other.weight",))):
        with RunStore.open(tmp_path, run=run) as store:
            np.testing.assert_array_equal(store.steps()["total_norm"], scale * np.arange(50))
            assert store.names() == names


def test_two_guards_in_one_process(tmp_path):
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 1))]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    guards = [Guard(m, store=tmp_path, log_every=7, health=False) for m in models]
    for _ in range(20):
        for model, opt, guard in zip(models, opts, guards):
            opt.zero_grad()
            model(torch.randn(4, 3)).pow(2).mean().backward()
            guard.step(opt)
    for guard in guards:
        guard.close()
    with RunStore.open(tmp_path) as store:
        runs = store.runs()
    assert [(r.steps, r.names) for r in runs] == [
        (20, ("weight", "bias")),
        (20, ("0.weight", "0.bias")),
    ]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from gradguard.record import Recorder
    path, value = sys.argv[1], float(sys.argv[2])
    with Recorder(path, log_every=7) as rec:
        rec.start(["w"])
        for step in range(300):
            rec.record(step, total_norm=torch.tensor(value), clipped_norm=value, clip_coef=1.0,
                       threshold=1.0, skipped=False, reason=0, loss=step * value)
    """
)


def test_two_processes_writing_one_directory_at_once(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir), value],
            env=env(),
            stderr=subprocess.PIPE,
        )
        for value in ("1.0", "2.0")
    ]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read().decode()
    with RunStore.open(run_dir) as store:
        runs = store.runs()
    assert len(runs) == 2 and {r.pid for r in runs} == {p.pid for p in procs}
    seen = set()
    for info in runs:
        with RunStore.open(run_dir, run=info.run) as store:
            steps = store.steps()
        values = set(steps["total_norm"].tolist())
        assert len(values) == 1 and info.steps == 300  # no row of the other process
        np.testing.assert_array_equal(steps["loss"], np.arange(300) * values.pop())
        seen |= set(steps["total_norm"].tolist())
    assert seen == {1.0, 2.0}


def test_a_killed_writer_reads_as_interrupted(tmp_path):
    code = (
        "import os, signal, sys, torch; from gradguard.record import Recorder; "
        "rec = Recorder(sys.argv[1], log_every=1); rec.start(['w']); "
        "rec.record(0, total_norm=torch.tensor(1.0), clipped_norm=1.0, clip_coef=1.0, "
        "threshold=1.0, skipped=False, reason=0); rec.drain(); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env(), timeout=240)
    with RunStore.open(tmp_path) as store:
        info = store.info()
        assert store.steps()["step"].tolist() == [0]
    assert info.status == "interrupted" and info.ended is None
    assert _record(tmp_path, range(1, 3), resume="latest", names=("w",)) == 1  # resumable


def test_a_damaged_run_row_leaves_the_other_runs_readable(tmp_path):
    import sqlite3

    _record(tmp_path, range(4))
    _record(tmp_path, range(6))
    conn = sqlite3.connect(tmp_path / "gradguard.db")
    conn.execute("UPDATE runs SET names = '{' WHERE run = 1")
    conn.commit()
    conn.close()
    with RunStore.open(tmp_path) as store:
        assert store.names() == NAMES and len(store.steps()["step"]) == 6
        with pytest.raises(StoreError, match="run 1's names is not valid JSON"):
            store.runs()
    with RunStore.open(tmp_path, run=1) as store, pytest.raises(StoreError, match="run 1"):
        store.meta()

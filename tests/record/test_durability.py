"""A training process killed mid-run keeps its flushed steps; SIGTERM flushes everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gradguard.record import RunStore, StoreError

LOG_EVERY = 10

TRAIN = textwrap.dedent(
    """
    import sys, time, torch
    from gradguard import measure
    from gradguard.record import Recorder

    run_dir, progress = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(run_dir, log_every=LOG_EVERY)
    rec.start([n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()])
    with open(progress, "w") as out:
        for step in range(100000):
            x = torch.randn(32, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            stats = measure(model.named_parameters())
            coef = torch.clamp(1.0 / (stats.total_norm + 1e-6), max=1.0)
            opt.step()
            rec.record(step, total_norm=stats.total_norm, clipped_norm=stats.total_norm * coef,
                       clip_coef=coef, threshold=1.0, skipped=False, reason=0,
                       loss=loss.detach(), stats=stats if rec.wants_tensor_norms(step) else None)
            out.write(f"{step}\\n")
            out.flush()
            time.sleep(0.002)
    """
).replace("LOG_EVERY", str(LOG_EVERY))


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    run_dir, progress = tmp_path / "run", tmp_path / "progress.txt"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(progress)], env=env, stderr=subprocess.PIPE
    )
    return proc, run_dir, progress


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()}")
        try:
            with RunStore.open(run_dir) as store:
                if len(store.steps()["step"]) >= count:
                    return
        except StoreError:
            pass  # not created yet
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training did not flush in time")


def _last_progress(progress: Path) -> int:
    lines = progress.read_text().split()
    return int(lines[-1])


def test_sigkill_keeps_every_flushed_interval(tmp_path):
    proc, run_dir, progress = _start(tmp_path)
    _wait_for_steps(proc, run_dir, 3 * LOG_EVERY)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = _last_progress(progress)
    with RunStore.open(run_dir) as store:
        steps = store.steps()
        snap_steps, names, norms = store.tensor_norms()
    n = len(steps["step"])
    np.testing.assert_array_equal(steps["step"], np.arange(n))  # contiguous from 0
    assert n % LOG_EVERY == 0  # only whole intervals
    assert last - n < LOG_EVERY  # at most the last unflushed interval is lost
    assert np.isfinite(steps["total_norm"]).all() and np.isfinite(steps["loss"]).all()
    assert len(names) == 4 and norms.shape == (len(snap_steps), 4)
    np.testing.assert_array_equal(snap_steps, np.arange(0, n, LOG_EVERY))


def test_sigterm_flushes_everything_then_dies_as_before(tmp_path):
    proc, run_dir, progress = _start(tmp_path)
    _wait_for_steps(proc, run_dir, 2 * LOG_EVERY)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the default action still ran
    last = _last_progress(progress)
    with RunStore.open(run_dir) as store:
        steps = store.steps()["step"]
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    assert steps[-1] >= last  # every recorded step reached the store
    assert steps[-1] <= last + 1


def test_random_sigkills_lose_at_most_one_interval():
    """A handful of the kills ``benchmarks/crash.py`` makes by the hundred."""
    root = Path(__file__).resolve().parents[2]
    src = str(root / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "crash.py"),
            "--trials",
            "8",
            "--log-every",
            "5",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 SIGKILLs" in out.stdout and "failures: 0" in out.stdout

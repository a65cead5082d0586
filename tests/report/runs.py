"""Shared run fixtures for the report and CLI tests (recorded once per session)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EVIL = "<script>alert(1)</script>"
STEPS = 200
SPIKES = (120, 121)
NAN_STEP = 160
_CACHE: dict[str, Path] = {}


def record_run(root: Path) -> Path:
    """Train a tiny model under a real Guard + Recorder, with spikes and a NaN batch."""
    import torch
    from torch import nn

    from gradguard import Guard
    from gradguard.record import Recorder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.hidden = nn.Linear(16, 16)
            self.out = nn.Linear(16, 1)
            self.add_module(EVIL, nn.Linear(1, 1))  # unused in forward: a dead layer

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run_dir = root / "run"
    recorder = Recorder(run_dir, log_every=20, tensor_every=5, config={"lr": 0.05, "note": EVIL})
    guard = Guard(model, recorder=recorder)
    try:
        for step in range(STEPS):
            x = torch.randn(16, 8)
            y = torch.sin(x.sum(1, keepdim=True))
            if step in SPIKES:
                x = x * 100.0
            if step == NAN_STEP:
                y[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            # the unused layer never gets a gradient: give it an explicit zero one
            for p in getattr(model, EVIL).parameters():
                p.grad = torch.zeros_like(p)
            guard.step(opt, loss=loss)
    finally:
        recorder.close()
        torch.set_num_threads(threads)
    return run_dir


def recorded_run_dir(factory: pytest.TempPathFactory) -> Path:
    """The session's recorded run (made on first use)."""
    if "run" not in _CACHE:
        _CACHE["run"] = record_run(factory.mktemp("recorded"))
    return _CACHE["run"]


def write_synthetic(
    path: Path,
    n: int,
    names: list[str],
    every: int = 50,
    batch: int = 200_000,
    *,
    training: bool = False,
) -> dict[str, np.ndarray]:
    """Write ``n`` steps of synthetic norms (with spikes and one inf) via the store API;
    with ``training``, also a decaying loss, a cosine learning rate and an AMP loss scale
    that halves at the inf step."""
    from gradguard.record.store import RunStore
    from gradguard.schema import STEP_COLUMNS, HostBatch

    rng = np.random.default_rng(0)
    norm = np.exp(rng.normal(-1.0, 0.4, n))
    spikes = np.array([n // 7, n // 2, n - 3])
    norm[spikes] = 1e4
    norm[(2 * n) // 3] = np.inf
    thr = np.full(n, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.minimum(1.0, thr / norm)
    cols = {
        "total_norm": norm,
        "clipped_norm": np.minimum(norm, thr),
        "clip_coef": coef,
        "threshold": thr,
        "clipped": (norm > thr).astype(float),
        "skipped": np.isinf(norm).astype(float),
        "reason": np.isinf(norm).astype(float),
        "loss": np.full(n, np.nan),
        "lr": np.full(n, np.nan),
        "loss_scale": np.full(n, np.nan),
    }
    if training:
        t = np.arange(n) / max(n - 1, 1)
        cols["loss"] = 2.0 * np.exp(-3.0 * t) + 0.1 * rng.uniform(0, 1, n)
        cols["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * t))
        cols["loss_scale"] = np.where(np.arange(n) < (2 * n) // 3, 65536.0, 32768.0)
    snap_steps = np.arange(0, n, every)
    snaps = np.exp(rng.normal(-2.0, 1.0, (snap_steps.size, len(names)))).astype(np.float32)
    store = RunStore(path)
    store.start(names, config={"synthetic": True})
    try:
        for a in range(0, n, batch):
            b = min(a + batch, n)
            sel = (snap_steps >= a) & (snap_steps < b)
            store.write(
                HostBatch(
                    list(range(a, b)),
                    {c: cols[c][a:b].tolist() for c in STEP_COLUMNS},
                    tuple(names),
                    snap_steps[sel].tolist(),
                    snaps[sel].tolist(),
                )
            )
    finally:
        store.close()
    return {"spikes": spikes, **cols}


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m gradguard.cli ARGS`` in a subprocess, importing this checkout's gradguard."""
    import os

    import gradguard

    src = str(Path(gradguard.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}
    return subprocess.run(
        [sys.executable, "-m", "gradguard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )

"""SIGKILL a recording training loop at random moments and count the steps the store lost.

Each trial forks a process that trains a tiny model and records every step
(``Recorder``, ``log_every`` steps per flush), writing each step's number to a progress
file once ``record()`` returned; after a random delay the parent kills it with SIGKILL
and reads the run store. A trial fails when the stored steps are not ``0..n-1``, are not
whole intervals, or lost more than ``log_every`` steps (the bound the README states).
Half the trials also carry a slow sink (a remote logger that takes 20 ms a batch): it
must not widen the bound.

Run: ``PYTHONPATH=src python benchmarks/crash.py --trials 120`` (POSIX only).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from gradguard import measure
from gradguard.record import Recorder, RunStore


class SlowSink:
    """A logger that takes ``delay`` seconds per batch (a remote server)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def start(self, names, config) -> None:
        pass

    def write(self, batch) -> None:
        time.sleep(self.delay)

    def write_events(self, events) -> None:
        pass

    def close(self) -> None:
        pass


def train(
    run_dir: Path, progress: Path, log_every: int, slow: bool, seed: int, steps: int = 10**9
) -> None:
    """The killed process: train and record until killed (or ``steps`` steps)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sinks = [SlowSink(0.02)] if slow else []
    rec = Recorder(run_dir, sinks=sinks, log_every=log_every)
    rec.start([n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()])
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for step in range(steps):
        loss = model(torch.randn(32, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        stats = measure(model.named_parameters())
        coef = torch.clamp(1.0 / (stats.total_norm + 1e-6), max=1.0)
        opt.step()
        rec.record(
            step,
            total_norm=stats.total_norm,
            clipped_norm=stats.total_norm * coef,
            clip_coef=coef,
            threshold=1.0,
            skipped=False,
            reason=0,
            loss=loss.detach(),
            stats=stats,
        )
        os.write(fd, f"{step}\n".encode())  # record() returned: this step is done
    os.close(fd)
    rec.close()


def trial(root: Path, index: int, log_every: int, slow: bool, rng: random.Random) -> dict:
    run_dir, progress = root / f"run{index}", root / f"progress{index}.txt"
    pid = os.fork()
    if pid == 0:  # the training process
        try:
            train(run_dir, progress, log_every, slow, index)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 60
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # until it records
    time.sleep(rng.uniform(0.0, 1.0))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    text = progress.read_text() if progress.exists() else ""
    done = len(text.split())  # steps whose record() returned
    try:
        with RunStore.open(run_dir) as store:
            steps = store.steps()["step"].tolist()
    except Exception as e:  # a store that cannot be read is a failure, reported below
        return {"done": done, "stored": 0, "lost": done, "error": f"{type(e).__name__}: {e}"}
    stored = len(steps)
    problem = None
    if steps != list(range(stored)):
        problem = "stored steps are not 0..n-1"
    elif stored % log_every:
        problem = "a partial interval was stored"
    elif done - stored > log_every:
        problem = f"lost {done - stored} steps > log_every={log_every}"
    return {"done": done, "stored": stored, "lost": done - stored, "error": problem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--log-every", type=int, nargs="+", default=[5, 1, 20])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # before any fork: no thread pool to inherit
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as warm:  # import what a first step imports lazily
        train(Path(warm) / "run", Path(warm) / "progress", 2, False, 0, steps=4)
    failures: list[str] = []
    lost: dict[int, Counter] = {k: Counter() for k in args.log_every}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trials):
            log_every = args.log_every[i % len(args.log_every)]
            slow = i % 2 == 1
            result = trial(Path(tmp), i, log_every, slow, rng)
            lost[log_every][result["lost"]] += 1
            if result["error"]:
                failures.append(f"trial {i} (log_every={log_every}, slow={slow}): {result}")
    print(f"{args.trials} SIGKILLs in {time.perf_counter() - start:.0f} s")
    for log_every, counts in lost.items():
        n = sum(counts.values())
        if n:
            worst = max(counts)
            spread = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            print(
                f"log_every={log_every}: {n} kills, steps lost {{{spread}}}, "
                f"worst {worst} (bound {log_every})"
            )
    print(f"failures: {len(failures)}")
    for line in failures:
        print("  " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

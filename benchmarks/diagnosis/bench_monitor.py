"""The health monitor's cost per flush, early and late in a long run, and its state size.

``python -m benchmarks.diagnosis.bench_monitor [--flushes N] [--every K] [--rules]``:
feeds a synthetic run (noisy norms and loss, a snapshot per flush, an exploding episode
and a NaN every so often) to a ``HealthMonitor`` flush by flush, as the recorder's writer
thread would, and prints the median CPU time (``time.thread_time``) per flush over the
first and last hundred flushes and the pickled size of the monitor's state at both
points; ``--rules`` replays the run through a second monitor that times each signal,
rule and the snapshot grouping. Host-side only: torch is not imported.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from gradguard.health import HealthMonitor
from gradguard.health.signals import LayerSnapshot
from gradguard.schema import HostBatch

NAMES = tuple(f"block{i}.{p}" for i in range(30) for p in ("weight", "bias"))


def flush(i: int, every: int, rng: np.random.Generator) -> HostBatch:
    norms = np.exp(rng.normal(np.log(0.5), 0.1, every))
    if i % 97 == 50:
        norms[5:45] *= 100.0
    if i % 131 == 7:
        norms[3] = np.nan
    steps = list(range(i * every, (i + 1) * every))
    columns = {
        "total_norm": norms.tolist(),
        "threshold": [1.0] * every,
        "loss": np.exp(rng.normal(0.0, 0.05, every)).tolist(),
        "lr": [1e-3] * every,
    }
    snapshot = np.exp(rng.normal(-2.0, 0.3, len(NAMES))).tolist()
    return HostBatch(steps, columns, NAMES, [steps[0]], [snapshot])


def _timed(fn: Callable, label: str, spent: dict[str, float]) -> Callable:
    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    return timed


def breakdown(batches: list[HostBatch]) -> dict[str, float]:
    """CPU seconds per flush of each signal update, rule detector and the snapshot
    grouping, over ``batches`` fed to a fresh monitor."""
    spent: dict[str, float] = defaultdict(float)
    monitor = HealthMonitor()
    for signal in monitor.context.signals:
        signal.update = _timed(signal.update, type(signal).__name__, spent)
    for rule in monitor.rules:
        detector = "on_snapshot" if rule.scope == "layer" else "on_steps"
        setattr(rule, detector, _timed(getattr(rule, detector), type(rule).__name__, spent))
    build = LayerSnapshot.__dict__["build"]
    LayerSnapshot.build = _timed(LayerSnapshot.build, "LayerSnapshot.build", spent)
    try:
        for batch in batches:
            monitor.update(batch)
    finally:
        LayerSnapshot.build = build
    return {label: seconds / len(batches) for label, seconds in spent.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flushes", type=int, default=4000)
    parser.add_argument("--every", type=int, default=50, help="steps per flush (log_every)")
    parser.add_argument("--rules", action="store_true", help="CPU time per signal and rule")
    args = parser.parse_args(argv)
    if args.flushes < 200 or args.every < 1:
        parser.error("--flushes must be >= 200 and --every >= 1")
    rng = np.random.default_rng(0)
    monitor = HealthMonitor()
    times, sizes, batches = [], {}, []
    for i in range(args.flushes):
        batch = flush(i, args.every, rng)
        batches.append(batch)
        start = time.thread_time()
        monitor.update(batch)
        times.append(time.thread_time() - start)
        if i in (99, args.flushes - 1):
            sizes[i] = len(pickle.dumps(monitor))
    early = statistics.median(times[:100]) * 1e3
    late = statistics.median(times[-100:]) * 1e3
    steps = args.flushes * args.every
    print(f"{args.flushes} flushes of {args.every} steps ({steps} steps, {len(NAMES)} tensors)")
    print(f"median CPU time per flush: first 100 {early:.2f} ms, last 100 {late:.2f} ms")
    print(
        f"monitor state (pickled): after 100 flushes {sizes[99]} B, at the end "
        f"{sizes[args.flushes - 1]} B"
    )
    if args.rules:
        print("mean CPU time per flush, timed one by one:")
        for label, seconds in sorted(breakdown(batches).items(), key=lambda item: -item[1]):
            print(f"  {label:24s} {seconds * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

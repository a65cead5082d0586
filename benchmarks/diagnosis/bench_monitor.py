"""The health monitor's cost per flush, early and late in a long run, and its state size.

``python -m benchmarks.diagnosis.bench_monitor [--flushes N] [--every K]``: feeds a
synthetic run (noisy norms and loss, a snapshot per flush, an exploding episode and a
NaN every so often) to a ``HealthMonitor`` flush by flush, as the recorder's writer
thread would, and prints the median time per flush over the first and last hundred
flushes and the pickled size of the monitor's state at both points. Host-side only:
torch is not imported.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np

from gradguard.health import HealthMonitor
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flushes", type=int, default=4000)
    parser.add_argument("--every", type=int, default=50, help="steps per flush (log_every)")
    args = parser.parse_args(argv)
    if args.flushes < 200 or args.every < 1:
        parser.error("--flushes must be >= 200 and --every >= 1")
    rng = np.random.default_rng(0)
    monitor = HealthMonitor()
    times, sizes = [], {}
    for i in range(args.flushes):
        batch = flush(i, args.every, rng)
        start = time.perf_counter()
        monitor.update(batch)
        times.append(time.perf_counter() - start)
        if i in (99, args.flushes - 1):
            sizes[i] = len(pickle.dumps(monitor))
    early = statistics.median(times[:100]) * 1e3
    late = statistics.median(times[-100:]) * 1e3
    steps = args.flushes * args.every
    print(f"{args.flushes} flushes of {args.every} steps ({steps} steps, {len(NAMES)} tensors)")
    print(f"median time per flush: first 100 {early:.2f} ms, last 100 {late:.2f} ms")
    print(
        f"monitor state (pickled): after 100 flushes {sizes[99]} B, at the end "
        f"{sizes[args.flushes - 1]} B"
    )


if __name__ == "__main__":
    main()

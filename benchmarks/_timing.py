"""Interleaved timing: every candidate runs once per round, medians over rounds.

The order of the candidates is shuffled every round (seeded): on a shared machine the
candidate that runs right after a heavy one pays for its cache misses, and a fixed order
would charge that to the same candidate every time.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, seed: int = 0
):
    """Median seconds per call of each candidate, run round-robin to share machine noise."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    order = list(candidates)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}

"""Synthetic recorded series for the health-rule tests: batches of steps as a recorder
would flush them, and a monitor run over them."""

from __future__ import annotations

import math

import numpy as np

from gradguard.health import HealthConfig, HealthMonitor
from gradguard.schema import HostBatch, SkipReason

INF = math.inf
NAN = math.nan
NONFINITE = float(SkipReason.NONFINITE)
AMP = float(SkipReason.AMP_OVERFLOW)


def noisy(level, n, seed=0, spread=0.1):
    """``n`` log-normal values around ``level``."""
    rng = np.random.default_rng(seed)
    return (level * np.exp(rng.normal(0.0, spread, n))).tolist()


def batch(
    norms,
    *,
    start=0,
    threshold=INF,
    loss=None,
    lr=None,
    skipped=None,
    reason=None,
    clipped=None,
    scale=None,
    names=(),
    snapshots=(),
):
    """A HostBatch of ``len(norms)`` steps from ``start``; ``snapshots``: (step, norms) pairs."""
    n = len(norms)
    thresholds = [float(threshold)] * n if np.isscalar(threshold) else list(threshold)
    columns = {
        "total_norm": [float(v) for v in norms],
        "threshold": thresholds,
        "clipped": list(clipped)
        if clipped is not None
        else [float(v > t) for v, t in zip(norms, thresholds)],
        "loss": list(loss) if loss is not None else [NAN] * n,
        "skipped": list(skipped) if skipped is not None else [0.0] * n,
        "reason": list(reason) if reason is not None else [0.0] * n,
    }
    if lr is not None:
        columns["lr"] = [float(v) for v in lr] if not np.isscalar(lr) else [float(lr)] * n
    if scale is not None:
        columns["loss_scale"] = list(scale)
    absent = frozenset() if loss is not None else frozenset({"loss"})
    return HostBatch(
        list(range(start, start + n)),
        columns,
        tuple(names),
        [s for s, _ in snapshots],
        [list(r) for _, r in snapshots],
        absent=absent,
    )


def split(whole: HostBatch, every: int) -> list[HostBatch]:
    """``whole`` cut into flushes of ``every`` steps (snapshots go with their step)."""
    out = []
    for lo in range(0, len(whole.steps), every):
        steps = whole.steps[lo : lo + every]
        keep = [i for i, s in enumerate(whole.tensor_steps) if steps[0] <= s <= steps[-1]]
        out.append(
            HostBatch(
                steps,
                {k: v[lo : lo + every] for k, v in whole.columns.items()},
                whole.names,
                [whole.tensor_steps[i] for i in keep],
                [whole.tensor_norms[i] for i in keep],
                absent=whole.absent,
            )
        )
    return out


def run(*batches, config=None, order=None, every=None):
    """Every finding reported over ``batches`` (each flush's), in order."""
    monitor = HealthMonitor(config, order=order)
    out = []
    for b in batches:
        for part in split(b, every) if every else [b]:
            out.extend(monitor.update(part))
    return out


def final(*batches, config=None, order=None, every=None):
    """The last state of each episode reported over ``batches``, by first step."""
    latest = {}
    for finding in run(*batches, config=config, order=order, every=every):
        latest[finding.key] = finding
    return sorted(latest.values(), key=lambda f: (f.steps[0], f.kind.value))


def kinds(findings):
    return [f.kind.value for f in findings]


def config(**overrides):
    return HealthConfig(**overrides)

"""Deterministic per-step values and a GradStats stand-in, for recorder and store tests."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from gradguard.record import Recorder, SkipReason

NAMES = ("embed.weight", "block.0.attn.weight", "head.bias")


def step_values(step: int) -> dict:
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


def norms(step: int) -> torch.Tensor:
    base = torch.arange(1, len(NAMES) + 1, dtype=torch.float32) * (step + 1) * 0.125
    if step == 6:
        base[1] = float("inf")
    return base


class FakeStats:
    """A GradStats stand-in carrying only what the Recorder reads."""

    def __init__(self, norms: torch.Tensor) -> None:
        self.norms = norms
        self.names = NAMES
        self.shapes = tuple(torch.Size([2]) for _ in NAMES)

    def labels(self) -> tuple[str, ...]:
        return NAMES


def run_steps(recorder: Recorder, steps: range) -> dict[int, dict]:
    recorded = {}
    for s in steps:
        values = step_values(s)
        stats = FakeStats(norms(s)) if recorder.wants_tensor_norms(s) else None
        recorder.record(s, stats=stats, **values)
        recorded[s] = values
    return recorded


def expected(values: dict, column: str) -> float:
    if column == "clipped":
        return float(values["clip_coef"] < 1)
    v = values.get(column)
    if v is None:
        return math.nan
    return float(v)


def env() -> dict:
    """The environment for a subprocess that imports this checkout's gradguard."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}

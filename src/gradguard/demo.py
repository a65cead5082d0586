"""``gradguard demo``: the same run twice, unguarded and guarded, with bad batches in it.

A small tanh MLP learns a smooth regression with SGD + momentum. At two steps the
batch is corrupted (inputs ×100: a gradient spike), and at a later step one label is
NaN. Unguarded, the NaN reaches the weights and the run is lost; guarded, the spike
is clipped and the NaN step is skipped, and training goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .guard import Guard

SPIKE_STEPS = (300, 301)
NAN_STEP = 450


@dataclass
class RunSummary:
    """What one demo run did."""

    guarded: bool
    final_loss: float
    first_nonfinite_loss: int | None
    clipped_steps: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, list[str]]] = field(default_factory=list)
    weights_finite: bool = True
    seconds: float = 0.0


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def train(guarded: bool, steps: int = 600, seed: int = 0) -> RunSummary:
    """Train the demo model once; with ``guarded`` the default :class:`Guard` keeps it alive."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(8, 1, generator=gen)
    direction = direction / direction.norm()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = Guard(model) if guarded else None
    summary = RunSummary(guarded, math.nan, None)
    losses = []
    for step in range(steps):
        x = torch.randn(64, 8, generator=gen)
        y = torch.sin(2.0 * x @ direction)
        if step in SPIKE_STEPS:
            x = x * 100.0
        if step == NAN_STEP:
            y[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if guard is None:
            optimizer.step()
        else:
            result = guard.step(optimizer, loss=loss)
            assert result is not None
            if bool(result.skipped):
                summary.skipped.append((step, result.reason_label, result.nonfinite_names()))
            elif result.clip_coef.item() < 0.999:
                summary.clipped_steps.append(step)
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value) and step != NAN_STEP and summary.first_nonfinite_loss is None:
            summary.first_nonfinite_loss = step
    tail = losses[-50:]
    summary.final_loss = sum(tail) / len(tail)
    summary.weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    summary.seconds = time.perf_counter() - start
    return summary


def describe(run: RunSummary) -> list[str]:
    """A few lines telling what happened in one run."""
    title = "guarded (gradguard.Guard, default policy)" if run.guarded else "unguarded"
    lines = [f"{title}:"]
    lines.append(
        f"  final loss (mean of last 50 steps): {run.final_loss:.4g}; weights finite: "
        f"{run.weights_finite}; {run.seconds:.1f} s"
    )
    if run.first_nonfinite_loss is not None:
        lines.append(f"  loss non-finite from step {run.first_nonfinite_loss} on: the run is lost")
    if run.guarded:
        shown = ", ".join(str(s) for s in run.clipped_steps[:8])
        more = " ..." if len(run.clipped_steps) > 8 else ""
        lines.append(f"  clipped {len(run.clipped_steps)} steps: {shown}{more}")
        for step, reason, names in run.skipped:
            where = f" in {', '.join(names)}" if names else ""
            lines.append(f"  skipped step {step}: {reason}{where}")
    return lines


def main(steps: int = 600) -> int:
    """Run the demo and print what happened; returns a process exit code."""
    print(
        f"Training a tanh MLP with SGD+momentum for {steps} steps; corrupted batches "
        f"(inputs x100) at steps {SPIKE_STEPS}, a NaN label at step {NAN_STEP}.\n"
    )
    runs = [train(False, steps), train(True, steps)]
    for run in runs:
        print("\n".join(describe(run)))
        print()
    guarded = runs[1]
    ok = guarded.weights_finite and math.isfinite(guarded.final_loss)
    print("The guard kept the run alive." if ok else "The guarded run failed: please report.")
    return 0 if ok else 1

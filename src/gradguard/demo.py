"""``gradguard demo``: the same run twice, unguarded and guarded, with bad batches in it.

A small tanh MLP learns a smooth regression with SGD + momentum. At two steps the
batch is corrupted (inputs ×100: a gradient spike), and at a later step one label is
NaN. Unguarded, the NaN reaches the weights and the run is lost; guarded, the spike
is clipped and the NaN step is skipped, and training goes on.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._progress import progress
from .guard import Guard
from .policies import Monitor
from .schema import EventKind

SPIKE_STEPS = (300, 301)
NAN_STEP = 450


@dataclass
class RunSummary:
    """What one demo run did."""

    guarded: bool
    final_loss: float
    first_nonfinite_loss: int | None
    clipped_steps: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, list[str], str | None]] = field(default_factory=list)
    weights_finite: bool = True
    seconds: float = 0.0
    store: Path | None = None
    findings: list[str] = field(default_factory=list)


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def train(
    guarded: bool, steps: int = 600, seed: int = 0, store: str | os.PathLike[str] | None = None
) -> RunSummary:
    """Train the demo model once; with ``guarded`` the default :class:`Guard` keeps it alive.

    Unguarded runs go through a :class:`Guard` with the :class:`Monitor` policy, which
    measures and records but never changes a gradient. With ``store``, the run is
    recorded there and its health findings are read back into the summary.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(8, 1, generator=gen)
    direction = direction / direction.norm()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings are read back from the store below
        guard = Guard(model, None if guarded else Monitor(), store=store, log_every=25)
        summary = _train_loop(model, optimizer, guard, gen, direction, guarded, steps)
        guard.close()
    if store is not None:
        from .record import RunStore

        summary.store = Path(store)
        reader = RunStore.open(store)
        summary.findings = [e.message for e in reader.events() if EventKind.is_finding(e.kind)]
        reader.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _train_loop(model, optimizer, guard, gen, direction, guarded, steps) -> RunSummary:
    summary = RunSummary(guarded, math.nan, None)
    losses = []
    label = "guarded  " if guarded else "unguarded"
    for step in progress(range(steps), f"training {label}"):
        x = torch.randn(64, 8, generator=gen)
        y = torch.sin(2.0 * x @ direction)
        if step in SPIKE_STEPS:
            x = x * 100.0
        if step == NAN_STEP:
            y[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        result = guard.step(optimizer, loss=loss)
        assert result is not None
        if guarded:
            if bool(result.skipped):
                names = result.nonfinite_names()
                origin = guard.nonfinite_origin(result)
                summary.skipped.append((step, result.reason_label, names, origin))
            elif result.clip_coef.item() < 0.999:
                summary.clipped_steps.append(step)
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value) and step != NAN_STEP and summary.first_nonfinite_loss is None:
            summary.first_nonfinite_loss = step
    tail = losses[-50:]
    summary.final_loss = sum(tail) / len(tail)
    summary.weights_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
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
        for step, reason, names, origin in run.skipped:
            where = (
                f" in {len(names)} gradients, first in backward order: {origin}" if names else ""
            )
            lines.append(f"  skipped step {step}: {reason}{where}")
    for message in run.findings[:6]:
        lines.append(f"  finding: {message}")
    if run.store is not None:
        lines.append(f"  recorded in {run.store}")
    return lines


def main(steps: int = 600, out: str | os.PathLike[str] | None = None) -> int:
    """Run the demo and print what happened; returns a process exit code.

    With ``out``, both runs are recorded under it (``unguarded/``, ``guarded/``) and
    each gets an HTML report (``report.html`` in its run directory).
    """
    from .experiments import first_layer_norm_vs_depth, format_table, max_grad_vs_sequence_length

    print("1. The seeds' experiments, measured with gradguard.measure\n")
    depth = first_layer_norm_vs_depth()
    print(format_table("First-layer gradient norm of an MLP vs depth:", "depth", depth))
    print()
    length = max_grad_vs_sequence_length()
    print(format_table("Max |gradient| of a tanh RNN vs sequence length:", "length", length))
    print(
        "\nSigmoid and tanh stacks vanish with depth (< 1e-8 is the seeds' alarm level), and so\n"
        "does ReLU with PyTorch's default init; He init keeps it alive far deeper. The seeds'\n"
        "RNN (W_hh = 2.0) saturates tanh, so its gradient stops growing; an orthogonal W_hh\n"
        "of gain 3 explodes with sequence length.\n"
    )
    print(
        f"2. Training a tanh MLP with SGD+momentum for {steps} steps; corrupted batches "
        f"(inputs x100) at steps {SPIKE_STEPS}, a NaN label at step {NAN_STEP}.\n"
    )
    root = Path(out) if out is not None else None
    runs = [
        train(False, steps, store=root / "unguarded" if root else None),
        train(True, steps, store=root / "guarded" if root else None),
    ]
    for run in runs:
        print("\n".join(describe(run)))
        print()
    guarded = runs[1]
    ok = guarded.weights_finite and math.isfinite(guarded.final_loss)
    print("The guard kept the run alive." if ok else "The guarded run failed: please report.")
    if root is not None:
        from .report import build_report

        print()
        for run in runs:
            assert run.store is not None
            started = time.perf_counter()
            path = build_report(run.store)
            took = time.perf_counter() - started
            size = path.stat().st_size / 1e3
            print(f"report: {path} ({size:.0f} kB, built in {took:.2f} s)")
    return 0 if ok else 1


def efficacy_tables(quick: bool = False, seeds: int = 3) -> str:
    """The efficacy experiments' tables (``benchmarks/efficacy``, in a source checkout)."""
    import sys

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "efficacy").is_dir():
        raise SystemExit(
            "gradguard: error: --full needs a source checkout: benchmarks/efficacy is not "
            "installed with the package"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.efficacy import run_all

    print("\n3. Efficacy experiments (benchmarks/efficacy): this takes several minutes\n")
    return run_all(quick=quick, seeds=seeds)

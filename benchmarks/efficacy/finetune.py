"""Fine-tuning: runs whose loss starts flat and noisy. Does the guard cry wolf?

``python -m benchmarks.efficacy.finetune [--seeds N] [--jobs J] [--steps S] [--rows a,b]``:
a model is first trained 300 steps (Adam, lr 3e-3, batches of 32; the same for every
seed), then trained on by a fresh optimizer under the guard for ``S`` (400) steps — a
fine-tuning run: its loss is near its floor from the first step, and each batch loss is
noise around it. Set-ups (MLPs on sklearn's bundled tables): ``digits``, ``wine`` and
``cancer`` classifiers (cross-entropy: a fitted classifier's batch losses spread over
decades, most batches easy), ``diabetes`` regression (MSE), and ``noise``: regression
on random targets from the first step (nothing to learn). Optimizers: Adam lr 1e-4 and
SGD lr 0.01 with momentum 0.9.

Per row: runs whose FeedbackClip declared a loss divergence (none is real here), runs
with more than 5 % of steps clipped, runs whose final loss on the whole table is more
than 5 % (or 0.01) above the unclipped run's, and runs with a health finding.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .families import closed_findings, guard_for, train_step
from .grid import _table, standard_target
from .parallel import starmap, sweep_arguments
from .tables import markdown

SETUPS = ("digits", "wine", "cancer", "diabetes", "noise")
OPTIMIZERS = ("adam", "sgd")
ROWS = ("none", "default")


def _data(setup: str) -> tuple[Tensor, Tensor, bool]:
    """Inputs, targets, and whether the loss is cross-entropy."""
    if setup in ("digits", "wine"):
        return (*_table(setup), True)
    if setup == "cancer":
        return (*_table("breast_cancer"), True)
    if setup == "diabetes":
        return _table("diabetes")[0], standard_target("diabetes"), False
    draw = torch.Generator().manual_seed(123)
    return torch.randn(256, 8, generator=draw), torch.randn(256, 1, generator=draw), False


def train(setup: str, optimizer_name: str, row: str, seed: int, steps: int = 400) -> tuple:
    """One fine-tuning run: (final loss, share of steps clipped, divergences, findings)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    x, y, classify = _data(setup)
    outputs = int(y.max()) + 1 if classify else 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.Tanh(), nn.Linear(64, outputs))

    def loss_of(batch: Tensor) -> Tensor:
        out = model(x[batch])
        if classify:
            return nn.functional.cross_entropy(out, y[batch])
        return nn.functional.mse_loss(out, y[batch])

    batches = torch.Generator().manual_seed(1000)
    if setup != "noise":  # the pre-training: the same for every seed and row
        pretrain = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            pretrain.zero_grad()
            loss_of(torch.randint(0, len(x), (32,), generator=batches)).backward()
            pretrain.step()
    torch.manual_seed(seed)
    batches = torch.Generator().manual_seed(seed)
    optimizer: Any = (
        torch.optim.Adam(model.parameters(), lr=1e-4)
        if optimizer_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    )
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "run"
        guard = guard_for(row, model, store)
        clipped = 0
        for _ in range(steps):
            loss = loss_of(torch.randint(0, len(x), (32,), generator=batches))
            clipped += train_step(guard, optimizer, loss)
        divergences = 0
        if guard is not None:
            divergences = sum(
                int(getattr(policy, "divergences", 0))
                for policy in getattr(guard.policy, "policies", (guard.policy,))
            )
        findings = closed_findings(guard, store)
    with torch.no_grad():
        final = float(loss_of(torch.arange(len(x))))
    return final, clipped / steps, divergences, findings


def main(argv: list[str] | None = None) -> None:
    args, rows = sweep_arguments(argv, __doc__, ROWS, 10, steps=400)
    setups = [(s, o) for s in SETUPS for o in OPTIMIZERS]
    specs = [(*setup, row, seed, args.steps) for setup in setups for row in rows
             for seed in range(args.seeds)]  # fmt: skip
    done = dict(zip(specs, starmap(train, specs, args.jobs)))
    print(f"{args.steps} steps of fine-tuning, seeds 0-{args.seeds - 1}\n")
    header = ["set-up", "row", "runs with a divergence (episodes)", "clipped: median, max",
              "runs clipped > 5 %", "runs > 1.05x unclipped (or +0.01)",
              "runs with a finding"]  # fmt: skip
    cells, totals = [], {row: [0, 0, 0, 0, 0] for row in rows[1:]}
    for setup in setups:
        for row in rows[1:]:
            pairs = [(done[(*setup, row, s, args.steps)], done[(*setup, "none", s, args.steps)])
                     for s in range(args.seeds)]  # fmt: skip
            rates = sorted(mine[1] for mine, _ in pairs)
            counts = [
                sum(mine[2] > 0 for mine, _ in pairs),
                sum(mine[2] for mine, _ in pairs),
                sum(rate > 0.05 for rate in rates),
                sum(mine[0] > free[0] + max(0.05 * abs(free[0]), 0.01) for mine, free in pairs),
                sum(bool(mine[3]) for mine, _ in pairs),
            ]
            totals[row] = [a + b for a, b in zip(totals[row], counts)]
            median = rates[len(rates) // 2]
            cells.append([", ".join(setup), row, f"{counts[0]} ({counts[1]})",
                          f"{median:.1%}, {rates[-1]:.1%}", *map(str, counts[2:])])  # fmt: skip
    n = len(setups) * args.seeds
    for row, t in totals.items():
        counted = (f"{k} of {n}" for k in t[2:])
        cells.append(["**all**", row, f"{t[0]} of {n} ({t[1]})", "", *counted])
    print(markdown(header, cells))


if __name__ == "__main__":
    main()

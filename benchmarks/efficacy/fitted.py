"""Healthy classifiers trained until they fit their tables: does a policy stay quiet?

``python -m benchmarks.efficacy.fitted [--seeds N] [--jobs J] [--steps S] [--rows a,b]``:
breast cancer, wine, digits and iris (standardised) as a 128-64 ReLU MLP, trained
``S`` (2,000) steps of 32 by Adam (lr 1e-3), AdamW (3e-3, weight decay 0.01), SGD with
momentum 0.9 (lr 0.05) or 0.99 (lr 0.005), or plain SGD (lr 0.2); every run trains.
Late in such a run most batches are fitted and their gradients vanish, while the few
examples still wrong give gradients a hundred times larger: the norms span decades
with no fault in sight. Per run: the share of steps a policy clips (all steps, and the
second half) and the final cross-entropy on the whole table against the unclipped run
of the same seed. Rows are the efficacy suite's names.
"""

from __future__ import annotations

import warnings
from statistics import median

import torch
from torch import nn

import gradguard as gg

from .grid import _table
from .parallel import starmap, sweep_arguments
from .policies import resolve
from .suite import SWEEP

DATASETS = ("breast_cancer", "wine", "digits", "iris")
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01),
    "sgd-m0.9": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "sgd-m0.99": lambda params: torch.optim.SGD(params, lr=0.005, momentum=0.99),
    "sgd-plain": lambda params: torch.optim.SGD(params, lr=0.2),
}
ROWS = ("none", "default", "ZClip (old default)")


def train(
    dataset: str, optimizer_name: str, row: str, seed: int, steps: int = 2000
) -> tuple[float, float, float]:
    """One run: (final cross-entropy, share of steps clipped, share in the second half)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    x, y = _table(dataset)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, int(y.max()) + 1),
    )  # fmt: skip
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    guard = None
    if row != "none":
        factory, _ = resolve(row, SWEEP)
        guard = gg.Guard(model, factory(), health=False)
    clipped = [False] * steps
    for step in range(steps):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        if guard is None:
            optimizer.step()
        else:
            clipped[step] = bool(guard.step(optimizer, loss=loss).clip_coef < 1)
    if guard is not None:
        guard.close()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    late = clipped[steps // 2 :]
    return final, sum(clipped) / steps, sum(late) / max(len(late), 1)


def main(argv: list[str] | None = None) -> None:
    args, rows = sweep_arguments(argv, __doc__, ROWS, 3, steps=2000)
    specs = [
        (d, o, row, seed, args.steps)
        for d in DATASETS
        for o in OPTIMIZERS
        for row in rows
        for seed in range(args.seeds)
    ]
    done = dict(zip(specs, starmap(train, specs, args.jobs)))
    seeds = range(args.seeds)
    print(f"{args.steps} steps, seeds 0-{args.seeds - 1}; per seed: final loss (clip rate)\n")
    print("| set-up | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for d in DATASETS:
        for o in OPTIMIZERS:
            cells = []
            for row in rows:
                runs = [done[(d, o, row, s, args.steps)] for s in seeds]
                text = ", ".join(f"{r[0]:.2g}" for r in runs)
                if row != "none":
                    text += f" ({median(r[1] for r in runs):.0%})"
                cells.append(text)
            print(f"| {d}, {o} | " + " | ".join(cells) + " |")
    print("\n| row | runs clipped > 5 % (of the second half's steps) | median clip rate | "
          "runs > 2x the unclipped loss + 0.001 |")  # fmt: skip
    print("|---|---|---|---|")
    for row in rows[1:]:
        runs = [(done[(d, o, row, s, args.steps)], done[(d, o, "none", s, args.steps)])
                for d in DATASETS for o in OPTIMIZERS for s in seeds]  # fmt: skip
        noisy = sum(mine[2] > 0.05 for mine, _ in runs)
        worse = sum(mine[0] > 2 * free[0] + 1e-3 for mine, free in runs)
        rate = median(mine[1] for mine, _ in runs)
        print(f"| {row} | {noisy} of {len(runs)} | {rate:.1%} | {worse} of {len(runs)} |")


if __name__ == "__main__":
    main()

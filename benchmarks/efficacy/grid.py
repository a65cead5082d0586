"""Small classifiers on scikit-learn's bundled tables under SGD, at LRs up to the edge of
stability: does a policy hold back runs that train, and does it rescue runs that diverge?

``python -m benchmarks.efficacy.grid [--seeds N] [--jobs J] [--rows a,b]``: breast
cancer, wine, digits and iris (standardised), each as a linear (softmax) model and a
64-unit MLP, trained 300 steps of 32 by SGD at lr 0.3, 1 or 2 without momentum, or 0.1
or 0.3 with momentum 0.9; final cross-entropy on the whole set. Per row: runs more than
20 % above the unclipped run of the same seed, more than 20 % below, and diverging runs
rescued (unclipped above 1, the row below 0.5). Rows are the efficacy suite's names.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import nn

import gradguard as gg

from .parallel import starmap, sweep_arguments
from .policies import resolve
from .suite import SWEEP

DATASETS = ("breast_cancer", "wine", "digits", "iris")
MODELS = ("linear", "mlp")
SETTINGS = ((0.3, 0.0), (1.0, 0.0), (2.0, 0.0), (0.1, 0.9), (0.3, 0.9))  # (lr, momentum)
ROWS = ("none", "default", "fb:step_ratio=0")


@cache
def _table(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import sklearn.datasets

    features, labels = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(labels, dtype=torch.long)


@cache
def standard_target(name: str) -> torch.Tensor:
    """A regression table's target (diabetes), standardised, as a column."""
    import sklearn.datasets

    _, target = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
    y = torch.tensor(target, dtype=torch.float32)
    return ((y - y.mean()) / y.std())[:, None]


def final_loss(
    dataset: str, model_kind: str, lr: float, momentum: float, row: str, seed: int
) -> float:
    """Train one run; its final cross-entropy on the whole table."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    x, y = _table(dataset)
    classes = int(y.max()) + 1
    torch.manual_seed(seed)
    if model_kind == "linear":
        model: nn.Module = nn.Linear(x.shape[1], classes)
    else:
        model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    factory, _ = resolve(row, SWEEP)
    guard = gg.Guard(model, factory(), health=False)
    for _ in range(300):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        guard.step(optimizer, loss=loss)
    guard.close()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def main(argv: list[str] | None = None) -> None:
    args, rows = sweep_arguments(argv, __doc__, ROWS, 4)
    specs = [
        (d, m, lr, mom, row, seed)
        for d in DATASETS
        for m in MODELS
        for lr, mom in SETTINGS
        for row in rows
        for seed in range(args.seeds)
    ]
    results = starmap(final_loss, specs, args.jobs)
    done = dict(zip(specs, results))
    runs = [(d, m, lr, mom, s) for d in DATASETS for m in MODELS for lr, mom in SETTINGS
            for s in range(args.seeds)]  # fmt: skip
    print(f"{len(runs)} runs per row\n")
    print("| row | > 20 % above unclipped | > 20 % below | diverging runs rescued |")
    print("|---|---|---|---|")
    for row in rows[1:]:
        above = below = rescued = 0
        for d, m, lr, mom, s in runs:
            free, mine = done[(d, m, lr, mom, "none", s)], done[(d, m, lr, mom, row, s)]
            above += mine > 1.2 * free + 1e-3 or (mine != mine and free == free)
            below += mine < free / 1.2 - 1e-3 or (free != free and mine == mine)
            rescued += not free <= 1.0 and mine < 0.5
        print(f"| {row} | {above} | {below} | {rescued} |")


if __name__ == "__main__":
    main()

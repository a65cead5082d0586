"""Healthy runs of model families and losses the suite lacks: does the guard stay quiet?

``python -m benchmarks.efficacy.families [--seeds N] [--jobs J] [--steps S] [--rows a,b]``:
six set-ups written for training, not to exercise a fault, each trained ``S`` (1,500)
steps of 32 by Adam (lr 1e-3) and by SGD with momentum 0.9, at a constant LR, with the
LR cut ×0.1 at half and three quarters of the run, and under cosine warm restarts every
250 steps (SGDR: the LR falls to zero and jumps back):

* ``gauss-nll``: a heteroscedastic regression on diabetes (mean and log-variance, a
  Gaussian negative log-likelihood that goes below zero);
* ``bn-cnn``: a CNN with batch norm and dropout on the digit images;
* ``smoothed``: a GELU MLP on digits with label smoothing 0.1 (a loss floor above zero);
* ``summed``: cross-entropy summed over the batch on wine (norms 32× a mean's);
* ``autoencoder``: a 64-32-8-32-64 ReLU autoencoder of the digit images (MSE; batch losses
  spread 0.8-2.2 at the start);
* ``offset``: cross-entropy plus a constant 50 on breast cancer (a regulariser's constant
  part: the loss never nears zero).

Per run: the final loss on the whole table (eval mode) against the unclipped run of the
same seed, the share of steps clipped, and the health findings the guard recorded (row
``monitor``: a guard that measures and diagnoses but never changes a step, so its
findings are the health rules' alone on the unclipped run).
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg

from .grid import _table
from .parallel import starmap, sweep_arguments
from .policies import resolve
from .suite import SWEEP
from .tables import markdown

Loss = Callable[[Tensor], Tensor]  # batch indices -> mean loss


def _gauss_nll() -> tuple[nn.Module, Loss, int]:
    import sklearn.datasets

    features, target = sklearn.datasets.load_diabetes(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(target, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 2))

    def loss(batch: Tensor) -> Tensor:
        mean, log_var = model(x[batch]).unbind(1)
        return (0.5 * (log_var + (y[batch] - mean) ** 2 / log_var.exp())).mean() - 1.0

    return model, loss, len(x)


def _classifier(table: str, model: nn.Module, **loss_args: object) -> tuple[nn.Module, Loss, int]:
    x, y = _table(table)
    if table == "digits" and isinstance(model[0], nn.Conv2d):
        x = x.view(-1, 1, 8, 8)
    return model, lambda b: nn.functional.cross_entropy(model(x[b]), y[b], **loss_args), len(x)


def _bn_cnn() -> tuple[nn.Module, Loss, int]:
    return _classifier(
        "digits",
        nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 64, 10),
        ),
    )  # fmt: skip


def _smoothed() -> tuple[nn.Module, Loss, int]:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    return _classifier("digits", model, label_smoothing=0.1)


def _summed() -> tuple[nn.Module, Loss, int]:
    model = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 3))
    return _classifier("wine", model, reduction="sum")


def _autoencoder() -> tuple[nn.Module, Loss, int]:
    x, _ = _table("digits")
    widths = (64, 32, 8, 32, 64)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    return model, lambda b: nn.functional.mse_loss(model(x[b]), x[b]), len(x)


def _offset() -> tuple[nn.Module, Loss, int]:
    x, y = _table("breast_cancer")
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2))
    return model, lambda b: nn.functional.cross_entropy(model(x[b]), y[b]) + 50.0, len(x)


FAMILIES = {
    "gauss-nll": _gauss_nll,
    "bn-cnn": _bn_cnn,
    "smoothed": _smoothed,
    "summed": _summed,
    "autoencoder": _autoencoder,
    "offset": _offset,
}
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "restarts")
ROWS = ("none", "default")


def _optimizer(name: str, family: str, params) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.002 if family == "summed" else 0.05, momentum=0.9)


def train(
    family: str, optimizer_name: str, schedule: str, row: str, seed: int, steps: int = 1500
) -> tuple[float, float, list[str]]:
    """One run: (final loss on the whole table, share of steps clipped, findings)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    torch.manual_seed(seed)
    model, loss_of, rows = FAMILIES[family]()
    optimizer = _optimizer(optimizer_name, family, model.parameters())
    if schedule == "restarts":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, 250)
    else:
        milestones = [steps // 2, 3 * steps // 4] if schedule == "step" else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
    batches = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "run"
        guard = guard_for(row, model, store)
        clipped = 0
        for _ in range(steps):
            model.train()
            loss = loss_of(torch.randint(0, rows, (32,), generator=batches))
            clipped += train_step(guard, optimizer, loss)
            scheduler.step()
        findings = closed_findings(guard, store)
    model.eval()
    with torch.no_grad():
        final = float(loss_of(torch.arange(rows)))
    return final, clipped / steps, findings


def guard_for(row: str, model: nn.Module, store: Path) -> gg.Guard | None:
    """The row's guard, recording to ``store``: none for ``none``; for ``monitor`` one that
    measures and diagnoses but never changes a step (the health rules alone)."""
    if row == "none":
        return None
    if row == "monitor":
        return gg.Guard(model, gg.Monitor(), store=store)
    factory, _ = resolve(row, SWEEP)
    return gg.Guard(model, factory(), store=store)


def train_step(guard: gg.Guard | None, optimizer: torch.optim.Optimizer, loss: Tensor) -> bool:
    """Back-propagate ``loss`` and step, through ``guard`` where there is one; whether
    the step was clipped."""
    optimizer.zero_grad()
    loss.backward()
    if guard is None:
        optimizer.step()
        return False
    return bool(guard.step(optimizer, loss=loss).clip_coef < 1)


def closed_findings(guard: gg.Guard | None, store: Path) -> list[str]:
    """Close ``guard`` and read back its findings as ``kind@first step``."""
    if guard is None:
        return []
    guard.close()
    from benchmarks.diagnosis.scorer import read_findings

    return [f"{f.kind}@{f.steps[0]}" for f in read_findings(store)]


def main(argv: list[str] | None = None) -> None:
    args, rows = sweep_arguments(argv, __doc__, ROWS, 2, steps=1500)
    setups = [(f, o, s) for f in FAMILIES for o in OPTIMIZERS for s in SCHEDULES]
    specs = [(*setup, row, seed, args.steps) for setup in setups for row in rows
             for seed in range(args.seeds)]  # fmt: skip
    done = dict(zip(specs, starmap(train, specs, args.jobs)))
    print(f"{args.steps} steps, seeds 0-{args.seeds - 1}; per seed: final loss "
          "(clip rate) [findings]\n")  # fmt: skip
    cells = [
        [", ".join(setup)] + [_cell(done, setup, row, args) for row in rows] for setup in setups
    ]
    print(markdown(["set-up", *rows], cells))
    summary = []
    for row in rows[1:]:
        pairs = [(done[(*setup, row, s, args.steps)], done[(*setup, "none", s, args.steps)])
                 for setup in setups for s in range(args.seeds)]  # fmt: skip
        noisy = sum(mine[1] > 0.05 for mine, _ in pairs)
        worse = sum(mine[0] > free[0] + max(0.05 * abs(free[0]), 0.01) for mine, free in pairs)
        flagged = sum(bool(mine[2]) for mine, _ in pairs)
        summary.append([row, *(f"{k} of {len(pairs)}" for k in (noisy, worse, flagged))])
    header = ["row", "runs clipped > 5 %", "runs > 1.05x the unclipped loss (or +0.01)",
              "runs with a finding"]  # fmt: skip
    print("\n" + markdown(header, summary))


def _cell(done: dict, setup: tuple, row: str, args) -> str:
    """One set-up's runs under one row: losses per seed, then clip rates and findings."""
    runs = [done[(*setup, row, s, args.steps)] for s in range(args.seeds)]
    text = ", ".join(f"{r[0]:.4g}" for r in runs)
    if row != "none":
        text += " (" + ", ".join(f"{r[1]:.1%}" for r in runs) + ")"
        found = sorted({f for r in runs for f in r[2]})
        text += f" [{', '.join(found)}]" if found else ""
    return text


if __name__ == "__main__":
    main()

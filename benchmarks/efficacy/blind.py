"""A blind probe: model families, data and settings no other benchmark trains, guarded the
way a user guards a loop (``guard.step(optimizer, loss=loss)``), on seeds none used.

``python -m benchmarks.efficacy.blind [--seeds N] [--seed-base S] [--jobs J] [--rows a,b]
[--tasks a,b]``: written on 2026-11-30 after the default was fixed (commit 9b75a8c) and
first run before any change, to see whether the default's record on the suite holds on
runs it was never tuned on. Tasks:

* ``gru-*``: a byte-level GRU LM (embedding 32, hidden 96, context 48) on the standard
  library's source, 300 steps of 16 windows; SGD with momentum 0.9 at lr 0.5 (healthy)
  and 3 (too high), AdamW at 3e-3 and 3e-2;
* ``tf-*``: a pre-LayerNorm causal transformer (``nn.TransformerEncoder``, 2 layers,
  width 64) on the same bytes; AdamW at 1e-3 and 1e-2, SGD with momentum at 0.3 and 1;
* ``diabetes-*``: a 10-64-64-1 ReLU MLP regressing scikit-learn's diabetes target
  (standardised), 600 steps of 32; SGD with momentum at 0.01 and 0.1, Adam at 1e-2;
* ``iris-deep-*``: an 8-layer tanh MLP (width 32) on iris, SGD with momentum at 0.05 and 0.5;
* ``cancer-logreg-*``: logistic regression on breast cancer, plain SGD at lr 1 and
  momentum SGD at 0.3;
* ``wine-mlp``: a 128-unit ReLU MLP on wine, momentum SGD at 0.3.

The tables are standardised; a quarter of each (by seed) is held out, and the final loss
is measured there (held-out text for the LMs). Per task and row: the median final loss
over the seeds, each seed's, and the share of steps clipped; then the default against
the best fixed threshold and against unclipped training, by the suite's rule (median
within the compared row's seed noise). Rows are the suite's names.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

import gradguard as gg

from . import grid, tables, text
from .parallel import starmap, sweep_arguments
from .policies import DEFAULT, NONE, fixed_name, is_fixed, resolve
from .suite import SWEEP

ROWS = (NONE, *(fixed_name(t) for t in SWEEP), DEFAULT)
SEED_BASE = 101  # seeds no other benchmark trains


@dataclass(frozen=True)
class Task:
    """One probe: a model family (``gru``, ``tf`` or a table's name), an optimizer
    (``sgd``: momentum 0.9; ``sgd0``: none; ``adam``: Adam or, for the LMs, AdamW),
    its LR and the number of steps."""

    family: str
    optimizer: str
    lr: float
    steps: int


TASKS = {
    "gru-sgd-0.5": Task("gru", "sgd", 0.5, 300),
    "gru-sgd-3": Task("gru", "sgd", 3.0, 300),
    "gru-adamw-3e-3": Task("gru", "adam", 3e-3, 300),
    "gru-adamw-3e-2": Task("gru", "adam", 3e-2, 300),
    "tf-adamw-1e-3": Task("tf", "adam", 1e-3, 300),
    "tf-adamw-1e-2": Task("tf", "adam", 1e-2, 300),
    "tf-sgd-0.3": Task("tf", "sgd", 0.3, 300),
    "tf-sgd-1": Task("tf", "sgd", 1.0, 300),
    "diabetes-sgd-0.01": Task("diabetes", "sgd", 0.01, 600),
    "diabetes-sgd-0.1": Task("diabetes", "sgd", 0.1, 600),
    "diabetes-adam-1e-2": Task("diabetes", "adam", 1e-2, 600),
    "iris-deep-sgd-0.05": Task("iris", "sgd", 0.05, 600),
    "iris-deep-sgd-0.5": Task("iris", "sgd", 0.5, 600),
    "cancer-logreg-sgd0-1": Task("breast_cancer", "sgd0", 1.0, 600),
    "cancer-logreg-sgd-0.3": Task("breast_cancer", "sgd", 0.3, 600),
    "wine-mlp-sgd-0.3": Task("wine", "sgd", 0.3, 600),
}
CONTEXT = 48


class GRULM(nn.Module):
    """Byte embedding → one GRU layer → next-byte logits."""

    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(text.VOCAB, 32)
        self.rnn = nn.GRU(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, text.VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0])


class PreNormLM(nn.Module):
    """A causal pre-LayerNorm transformer from torch's own encoder layers."""

    def __init__(self, width: int = 64, layers: int = 2, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(text.VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, text.VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.position[:n]
        h = self.body(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def _table(name: str) -> tuple[Tensor, Tensor]:
    """Standardised features and the target: class labels, or diabetes' standardised value."""
    x, labels = grid._table(name)
    return x, (grid.standard_target(name) if name == "diabetes" else labels)


def _table_model(name: str, features: int, classes: int) -> nn.Module:
    if name == "diabetes":
        return nn.Sequential(
            nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )
    if name == "iris":  # deep and tanh
        layers: list[nn.Module] = [nn.Linear(features, 32), nn.Tanh()]
        for _ in range(6):
            layers += [nn.Linear(32, 32), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(32, classes))
    if name == "breast_cancer":
        return nn.Linear(features, classes)
    return nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, classes))


def _optimizer(task: Task, model: nn.Module) -> torch.optim.Optimizer:
    if task.optimizer == "adam":
        kind = torch.optim.AdamW if task.family in ("gru", "tf") else torch.optim.Adam
        return kind(model.parameters(), lr=task.lr)
    momentum = 0.9 if task.optimizer == "sgd" else 0.0
    return torch.optim.SGD(model.parameters(), lr=task.lr, momentum=momentum)


class _Problem(NamedTuple):
    """A model, its batches and loss, and its held-out loss once trained."""

    model: nn.Module
    batch: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    held_out: Callable[[], float]


def _next_byte_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _text_problem(task: Task, seed: int, batches: torch.Generator) -> _Problem:
    torch.manual_seed(seed)
    model = GRULM() if task.family == "gru" else PreNormLM()
    corpus = text.corpus()[0]

    def batch() -> tuple[Tensor, Tensor]:
        w = text.windows(corpus, 16, CONTEXT, batches)
        return w[:, :-1], w[:, 1:]

    return _Problem(model, batch, _next_byte_loss, lambda: text.held_out_loss(model, 64, CONTEXT))


def _table_problem(task: Task, seed: int, batches: torch.Generator) -> _Problem:
    x, y = _table(task.family)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, kept = order[: len(x) // 4], order[len(x) // 4 :]
    regression = task.family == "diabetes"
    loss = nn.functional.mse_loss if regression else nn.functional.cross_entropy
    torch.manual_seed(seed)
    model = _table_model(task.family, x.shape[1], 1 if regression else int(y.max()) + 1)

    def batch() -> tuple[Tensor, Tensor]:
        index = kept[torch.randint(0, len(kept), (32,), generator=batches)]
        return x[index], y[index]

    def held_out() -> float:
        with torch.no_grad():
            return loss(model(x[held]), y[held]).item()

    return _Problem(model, batch, loss, held_out)


def train(key: str, row: str, seed: int, steps: int | None = None) -> tuple[float, float]:
    """Train one run; ``(final held-out loss, share of steps clipped)``; inf if it diverged."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "gradguard:")
    task = TASKS[key]
    steps = task.steps if steps is None else steps
    factory, _ = resolve(row, SWEEP)
    batches = torch.Generator().manual_seed(seed + 7)
    make = _text_problem if task.family in ("gru", "tf") else _table_problem
    problem = make(task, seed, batches)
    optimizer = _optimizer(task, problem.model)
    guard = gg.Guard(problem.model, factory(), health=False)
    clipped = 0
    for _ in range(steps):
        inputs, targets = problem.batch()
        loss = problem.loss(problem.model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        result = guard.step(optimizer, loss=loss.detach())
        clipped += bool(result.clip_coef < 1.0)
    params = problem.model.parameters()
    final = problem.held_out() if all(bool(torch.isfinite(p).all()) for p in params) else math.inf
    return (final if math.isfinite(final) else math.inf), clipped / steps


def _noise(finals: list[float]) -> float:
    """The suite's seed noise: the standard deviation over seeds (finite ones)."""
    finite = [f for f in finals if math.isfinite(f)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def _score(finals: list[float]) -> tuple[int, float]:
    """Lower is better: diverged seeds, then the median final loss."""
    return sum(not math.isfinite(f) for f in finals), tables.median(finals)


def verdict(mine: list[float], other: list[float]) -> str:
    """``mine`` against ``other`` by the suite's rule: diverged seeds, then the median
    within ``other``'s seed noise."""
    (lost_a, a), (lost_b, b) = _score(mine), _score(other)
    if lost_a != lost_b:
        return "beats" if lost_a < lost_b else "worse"
    if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) <= _noise(other):
        return "matches"
    return "beats" if a < b else "worse"


def report(keys: list[str], rows: list[str], done: dict) -> str:
    """One table per task, then the default's verdicts."""
    out = []
    summary = []
    for key in keys:
        out.append(f"#### {key}\n")
        lines = []
        for row in rows:
            runs = done[(key, row)]
            finals = [f for f, _ in runs]
            lines.append(
                [
                    row,
                    tables.num(tables.median(finals), 4),
                    " ".join(tables.num(f, 4) for f in finals),
                    " ".join(f"{c:.0%}" for _, c in runs),
                ]
            )
        out.append(tables.markdown(["row", "median", "per seed", "clipped"], lines) + "\n")
        fixed = [r for r in rows if is_fixed(r)]
        if DEFAULT in rows and fixed:
            finals = {r: [f for f, _ in done[(key, r)]] for r in rows}
            best = min(fixed, key=lambda r: _score(finals[r]))
            rate = tables.median([c for _, c in done[(key, DEFAULT)]])
            summary.append(
                [
                    key,
                    f"{tables.num(tables.median(finals[NONE]), 4)}",
                    f"{best}: {tables.num(tables.median(finals[best]), 4)}",
                    f"{tables.num(tables.median(finals[DEFAULT]), 4)} ({rate:.0%} clipped)",
                    verdict(finals[DEFAULT], finals[best]),
                    verdict(finals[DEFAULT], finals[NONE]),
                ]
            )
    if summary:
        header = ["task", "unclipped", "best fixed", "default", "vs best", "vs unclipped"]
        out.append(tables.markdown(header, summary))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args, rows = sweep_arguments(argv, __doc__, ROWS, 3, seed_base=SEED_BASE, tasks=",".join(TASKS))
    keys = args.tasks.split(",")
    unknown = [k for k in keys if k not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {list(TASKS)}")
    seeds = range(args.seed_base, args.seed_base + args.seeds)
    specs = [(key, row, seed) for key in keys for row in rows for seed in seeds]
    start = time.perf_counter()
    results = starmap(train, specs, args.jobs)
    wall = time.perf_counter() - start
    done: dict = {}
    for (key, row, _), result in zip(specs, results):
        done.setdefault((key, row), []).append(result)
    print(f"seeds {seeds.start}–{seeds.stop - 1}\n")
    print(report(keys, rows, done))
    print(f"\n_{len(specs)} runs, {wall:.0f} s wall, {args.jobs} job(s)._")


if __name__ == "__main__":
    main()

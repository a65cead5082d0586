"""Long-range tasks for a vanilla tanh RNN, after Pascanu, Mikolov and Bengio (2013).

Each input step carries a value drawn from U(0, 1) and a marker bit; two steps are
marked, the first within the first tenth of the sequence and the second within the
first half. The target is the sum of the two marked values (addition problem) or
their product (multiplication problem), read from the last hidden state. The
network must carry information across at least T/2 steps, where the gradient of a
tanh RNN with a large recurrent matrix explodes.

A run is *solved* when the held-out mean squared error falls below ``solve_mse``;
training stops there, at a non-finite loss (*diverged*), or after ``steps``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

import gradguard as gg

from .policies import PolicyFactory


@dataclass(frozen=True)
class RNNConfig:
    """One long-range task and its training set-up."""

    task: str = "addition"  # or "multiplication"
    length: int = 60
    hidden: int = 32
    batch: int = 128
    steps: int = 3000
    lr: float = 0.05
    momentum: float = 0.9
    recurrent_gain: float = 1.1  # spectral radius scale of the initial recurrent matrix
    eval_every: int = 100
    eval_batch: int = 1000

    @property
    def solve_mse(self) -> float:
        """Solved below 5% of the target variance (predicting the mean scores 100%)."""
        variance = 1 / 6 if self.task == "addition" else 1 / 9 - 1 / 16
        return 0.05 * variance

    @property
    def label(self) -> str:
        return f"{self.task} T={self.length} lr {self.lr:g}"


@dataclass
class RNNResult:
    """What one (task, policy, seed) run did."""

    policy: str
    seed: int
    solved: bool
    diverged: bool
    steps: int  # steps taken (to solving, divergence, or the budget)
    test_mse: float  # last held-out MSE (nan when diverged)
    clipped: float  # fraction of steps whose gradient was scaled down
    skipped: int
    seconds: float


def batch(config: RNNConfig, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(n, T, 2)`` and their targets ``(n, 1)``."""
    t = config.length
    values = torch.rand(n, t, generator=gen)
    first = torch.randint(0, max(1, t // 10), (n,), generator=gen)
    second = torch.randint(max(1, t // 10), max(2, t // 2), (n,), generator=gen)
    marks = torch.zeros(n, t)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    a, b = values[rows, first], values[rows, second]
    target = a + b if config.task == "addition" else a * b
    return torch.stack([values, marks], dim=-1), target.unsqueeze(1)


class TanhRNN(nn.Module):
    """A one-layer tanh RNN and a linear read-out of its last state."""

    def __init__(self, hidden: int, gain: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.out(states[:, -1])


def train(config: RNNConfig, name: str, factory: PolicyFactory, seed: int) -> RNNResult:
    """Train one seed under one policy; data and initial weights depend on the seed only."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = TanhRNN(config.hidden, config.recurrent_gain)
    data = torch.Generator().manual_seed(1000 + seed)
    test_x, test_y = batch(config, config.eval_batch, torch.Generator().manual_seed(-1 - seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    guard = gg.Guard(model, factory())
    clipped = torch.zeros(())
    skipped = torch.zeros((), dtype=torch.long)
    solved = diverged = False
    mse = math.nan
    step = 0
    for step in range(1, config.steps + 1):
        x, y = batch(config, config.batch, data)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        result = guard.step(optimizer)
        assert result is not None
        clipped += (result.clip_coef < 0.999) & ~result.skipped
        skipped += result.skipped
        if step % config.eval_every == 0 or step == config.steps:
            with torch.no_grad():
                mse = nn.functional.mse_loss(model(test_x), test_y).item()
            if not math.isfinite(mse):
                diverged, mse = True, math.nan
                break
            if mse < config.solve_mse:
                solved = True
                break
    return RNNResult(
        name,
        seed,
        solved,
        diverged,
        step,
        mse,
        clipped.item() / step,
        int(skipped),
        time.perf_counter() - start,
    )

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
from dataclasses import dataclass

import torch
from torch import nn

from . import loop
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

    def lost(self, result: loop.Result) -> bool:
        """Diverged, or no better than predicting the mean (test MSE ≥ target variance)."""
        return result.diverged or not result.final < self.solve_mse / 0.05


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


def train(
    config: RNNConfig, name: str, factory: PolicyFactory, seed: int, rewind: dict | None = None
) -> loop.Result:
    """Train one seed under one policy; data and initial weights depend on the seed only.

    ``final`` is the last held-out MSE; ``solved`` whether it fell below ``solve_mse``.
    """
    torch.manual_seed(seed)
    model = TanhRNN(config.hidden, config.recurrent_gain)
    data = torch.Generator().manual_seed(1000 + seed)
    test_x, test_y = batch(config, config.eval_batch, torch.Generator().manual_seed(-1 - seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    state = {"mse": math.nan, "solved": False}

    def forward(step: int):
        x, y = batch(config, config.batch, data)
        loss = nn.functional.mse_loss(model(x), y)
        return loss, loss.detach(), True

    def check(step: int) -> bool:
        if step % config.eval_every and step != config.steps:
            return False
        with torch.no_grad():
            state["mse"] = nn.functional.mse_loss(model(test_x), test_y).item()
        state["solved"] = state["mse"] < config.solve_mse
        return bool(state["solved"])

    trace = loop.run(
        loop.Setup(model, optimizer), factory(), config.steps, forward, check=check, rewind=rewind
    )
    return loop.result(trace, name, seed, state["mse"], solved=state["solved"])

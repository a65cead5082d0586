"""A small CNN on scikit-learn's digits whose learning rate jumps in the middle of the run.

The 8×8 digit images (1,797, bundled with scikit-learn) are split per seed into 1,397
training and 400 test images. Two 3×3 convolutions (16, 32 channels, ReLU), a 2×2 max
pool and a linear classifier train with SGD (momentum 0.9). At ``jump_at`` a
``LambdaLR`` schedule multiplies the learning rate by ``jump`` (a schedule or config
bug, or a resumed run given the wrong LR). The metric is the test cross-entropy at
the end; a run whose test accuracy ends below ``lost_accuracy`` is *lost*.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import loop
from .policies import PolicyFactory


@dataclass(frozen=True)
class CNNConfig:
    """The digits task and its training set-up."""

    name: str = "LR jump"
    lr: float = 0.05
    momentum: float = 0.9
    batch: int = 64
    steps: int = 600
    jump_at: int = 300
    jump: float = 1.0  # LR multiplier from ``jump_at`` on (1: no jump)
    lost_accuracy: float = 0.5
    autocast: str | None = None  # "bf16", or "fp16" (with a GradScaler)

    def lost(self, result: loop.Result) -> bool:
        """Diverged, or test accuracy below ``lost_accuracy``."""
        return result.diverged or not result.extra["accuracy"] >= self.lost_accuracy

    @property
    def label(self) -> str:
        cast = f", {self.autocast} autocast" if self.autocast else ""
        if self.jump == 1.0:
            return f"CNN digits, SGD lr {self.lr:g}{cast}"
        return f"CNN digits, SGD lr {self.lr:g} ×{self.jump:g} at step {self.jump_at}{cast}"


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(labels, dtype=torch.long)


def split(seed: int) -> tuple[torch.Tensor, ...]:
    """``(train_x, train_y, test_x, test_y)``: 400 test images, the rest for training."""
    x, y = _digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3000 + seed))
    test, train = order[:400], order[400:]
    return x[train], y[train], x[test], y[test]


class SmallCNN(nn.Module):
    """conv 16 → conv 32 → max-pool → linear, ReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def train(
    config: CNNConfig, name: str, factory: PolicyFactory, seed: int, rewind: dict | None = None
) -> loop.Result:
    """Train one seed under one policy; data split, batches and weights depend on the seed."""
    train_x, train_y, test_x, test_y = split(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.jump if step >= config.jump_at else 1.0
    )
    data = torch.Generator().manual_seed(4000 + seed)

    def forward(step: int):
        index = torch.randint(0, len(train_y), (config.batch,), generator=data)
        logits = model(train_x[index]).float()
        loss = nn.functional.cross_entropy(logits, train_y[index])
        return loss, loss.detach(), True

    setup = loop.Setup(
        model,
        optimizer,
        schedule,
        autocast=loop.AUTOCAST[config.autocast],
        scaler=config.autocast == "fp16",
    )
    trace = loop.run(setup, factory(), config.steps, forward, rewind=rewind)
    with torch.no_grad():
        logits = model(test_x)
        test_loss = nn.functional.cross_entropy(logits, test_y).item()
        accuracy = (logits.argmax(1) == test_y).float().mean().item()
    return loop.result(trace, name, seed, test_loss, extra={"accuracy": accuracy})

"""Offline data for the corpus: scikit-learn's bundled tables and the standard library's source.

Every batch is drawn from a generator seeded by (run seed, step, micro-batch), so a run
is reproducible and a fault injected at step k meets the same batch in every policy.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Table:
    """A standardised feature table with integer classes or a standardised target."""

    x: Tensor  # (n, features) float32
    y: Tensor  # (n,) int64 classes, or (n, 1) float32 targets
    classes: int  # 0 for regression

    def batch(self, gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, self.x.shape[0], (size,), generator=gen)
        return self.x[index], self.y[index]


@functools.cache
def table(name: str) -> Table:
    """``digits``, ``wine``, ``breast_cancer`` (classes) or ``diabetes`` (regression)."""
    import sklearn.datasets as sets

    loaders = {
        "digits": sets.load_digits,
        "wine": sets.load_wine,
        "breast_cancer": sets.load_breast_cancer,
        "diabetes": sets.load_diabetes,
    }
    if name not in loaders:
        raise ValueError(f"table must be one of {sorted(loaders)}, got {name!r}")
    features, target = loaders[name](return_X_y=True)
    features = np.asarray(features, dtype=np.float64)
    features = (features - features.mean(0)) / (features.std(0) + 1e-8)
    x = torch.tensor(features, dtype=torch.float32)
    if name == "diabetes":
        target = (target - target.mean()) / target.std()
        return Table(x, torch.tensor(target, dtype=torch.float32).unsqueeze(1), 0)
    return Table(x, torch.tensor(target, dtype=torch.int64), int(target.max()) + 1)


@functools.cache
def digit_images() -> Tensor:
    """The 8×8 digits as images ``(n, 1, 8, 8)`` in [0, 1]."""
    import sklearn.datasets as sets

    return torch.tensor(sets.load_digits().images / 16.0, dtype=torch.float32).unsqueeze(1)


@functools.cache
def stdlib_bytes(limit: int = 400_000) -> Tensor:
    """The first ``limit`` bytes of the standard library's ``.py`` sources, as int64 tokens."""
    root = Path(os.__file__).parent
    chunks: list[bytes] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def text_batch(gen: torch.Generator, size: int, length: int) -> tuple[Tensor, Tensor]:
    """``size`` windows of ``length`` bytes and the next byte after each position."""
    tokens = stdlib_bytes()
    start = torch.randint(0, tokens.numel() - length - 1, (size,), generator=gen)
    offsets = start.unsqueeze(1) + torch.arange(length + 1)
    window = tokens[offsets]
    return window[:, :-1], window[:, 1:]


def generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The generator of one micro-batch."""
    return torch.Generator().manual_seed(((seed * 1_000_003) + step) * 17 + micro)

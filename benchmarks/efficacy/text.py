"""Real text that ships offline: the bytes of the Python standard library's source.

Files are sorted by name; every tenth is held out for evaluation, so the held-out
text is other modules, not other lines of the same ones.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

VOCAB = 256


@functools.cache
def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` byte tensors (uint8) of the stdlib's top-level ``*.py`` files."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    if len(files) < 20:
        raise RuntimeError(f"the standard library's source was not found next to {os.__file__}")
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    held = b"".join(f.read_bytes() for i, f in enumerate(files) if not i % 10)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(held)


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length + 1`` bytes (inputs and next-byte targets), long."""
    starts = torch.randint(0, data.numel() - length - 1, (n,), generator=gen)
    index = starts.unsqueeze(1) + torch.arange(length + 1)
    return data[index].long()


@functools.cache
def eval_windows(n: int, length: int) -> torch.Tensor:
    """A fixed held-out evaluation set (the same for every seed and policy)."""
    return windows(corpus()[1], n, length, torch.Generator().manual_seed(12345))


def held_out_loss(model: nn.Module, n: int, length: int) -> float:
    """Mean next-byte cross-entropy (nats per byte) of ``model`` on the held-out windows."""
    windows = eval_windows(n, length)
    with torch.no_grad():
        logits = model(windows[:, :-1]).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


@functools.cache
def unigram_entropy() -> float:
    """Entropy (nats per byte) of the held-out text's byte frequencies: a model that
    learned only which bytes are common scores this."""
    counts = torch.bincount(corpus()[1].long(), minlength=VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())

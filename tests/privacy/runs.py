"""Models, batches and Opacus set-ups shared by the privacy tests."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def small_model() -> nn.Module:
    """A tiny per-example-safe model: conv, LayerNorm, linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Flatten(), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 4)
    )


def batch(n: int = 7):
    """Inputs and labels for :func:`small_model`."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def data(n: int = 128, seed: int = 0) -> TensorDataset:
    """``n`` examples of 5 features and 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_private(opacus, z: float, batch_size: int = 16):
    """``PrivacyEngine.make_private`` (Poisson sampling, RDP accountant) on a small MLP
    over :func:`data`; returns ``(engine, model, optimizer, loader)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = opacus.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data(), batch_size=batch_size),
            noise_multiplier=z,
            max_grad_norm=1.0,
        )
    return engine, model, optimizer, loader


def dp_optimizer(opacus, module: nn.Module, z: float, clip_norm: float, expected: int, lr=0.1):
    """``module`` wrapped in a ``GradSampleModule`` and a flat ``DPOptimizer`` over it."""
    torch.manual_seed(0)
    model = opacus.GradSampleModule(module)
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=z,
        max_grad_norm=clip_norm,
        expected_batch_size=expected,
    )
    return model, optimizer


def record_step(recorder, step: int) -> None:
    """Record a placeholder step (the recorder flushes, and its listeners run, every
    ``log_every`` of them)."""
    recorder.record(
        step, total_norm=1.0, clipped_norm=1.0, clip_coef=1.0, threshold=1.0, skipped=0, reason=0
    )

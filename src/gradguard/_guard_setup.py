"""What a Guard checks and sets up around its steps: its arguments, the optimizer it is
given, the health rules and the backward order it attaches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _warn
from ._params import Collected, ParamsLike
from .ops import NUMPY, Ops


def check_health(health: Any) -> None:
    """``health`` must be a bool or a :class:`~gradguard.health.HealthConfig`."""
    if isinstance(health, bool):
        return
    from .health import HealthConfig

    if not isinstance(health, HealthConfig):
        raise TypeError(f"health must be True, False or a HealthConfig, got {health!r}")


def attach_health(recorder: Any, model: ParamsLike, health: Any, order: Any) -> Any:
    """Run the health rules at every flush of ``recorder`` (config from the model)."""
    from .health import HealthConfig
    from .health.listener import attach_health

    if isinstance(health, HealthConfig):
        config = health
    elif isinstance(model, torch.nn.Module):
        config = HealthConfig.for_model(model)
    else:
        config = HealthConfig()
    return attach_health(recorder, config, order=order)


def backward_order(model: ParamsLike) -> Any:
    """Learn the backward order of a module's parameters (hooks live for one backward)."""
    if not isinstance(model, torch.nn.Module):
        return None
    from .health import BackwardOrder

    try:
        return BackwardOrder(model)
    except ValueError:
        return None


def check_owner(
    optimizer: torch.optim.Optimizer, guarded: list[Tensor], collected: Collected
) -> None:
    """At the first step with ``optimizer``: it must update only parameters the guard sees."""
    ids = {id(p) for p in guarded}
    stray = [
        p
        for g in optimizer.param_groups
        for p in g["params"]
        if id(p) not in ids and p.grad is not None
    ]
    if stray:
        shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3])
        raise ValueError(
            f"optimizer: it updates {len(stray)} parameter(s) with gradients that the guard does "
            f"not measure (shapes {shapes}); build the Guard over the same parameters as the "
            "optimizer, or it would clip and skip without them"
        )
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    idle = [i for i, p in enumerate(collected.params) if id(p) not in owned]
    if idle:
        labels = collected.names or [f"parameters[{i}]" for i in range(len(collected.params))]
        _warn.warn(
            f"gradguard: {len(idle)} guarded parameter(s) with gradients are not updated by "
            f"this optimizer (e.g. {labels[idle[0]]!r}); their norms still count"
        )


def lr_value(lr: Any, xp: Ops) -> Any:
    """The learning rate as the policies get it: a number on the host path."""
    if isinstance(lr, Tensor) and xp is NUMPY:
        return float(lr)  # a CPU tensor: already on the host
    return lr


def check_scalar(name: str, value: Any) -> None:
    """``value`` must be ``None``, a number or a one-element tensor (``loss``, ``lr``)."""
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(
            f"{name} must be a number or a one-element tensor, got {type(value).__name__}"
        )

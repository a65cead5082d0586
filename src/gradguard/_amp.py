"""What the guard needs from ``torch.amp.GradScaler``: unscale once, read its inf check.

The guard unscales, folds the scaler's overflow flag into its own skip decision and
steps the optimizer itself (``scaler.update()`` stays the user's), so a policy skip
needs no host sync even with AMP. GradScaler keeps per-optimizer state privately;
these helpers read it in one place so a change in torch touches one file.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState


def _state(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    return scaler._per_optimizer_states[id(optimizer)]


def unscale_once(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Unscale the optimizer's gradients unless the user already did since ``update()``."""
    if _state(scaler, optimizer)["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def found_inf(scaler: GradScaler, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """The scaler's own verdict (0-d float on ``device``): > 0 when it will skip the step."""
    per_device = _state(scaler, optimizer)["found_inf_per_device"]
    total = torch.zeros((), dtype=torch.float32, device=device)
    for flag in per_device.values():
        total = total + flag.to(device, non_blocking=True)
    return total


def current_scale(scaler: GradScaler) -> Tensor | None:
    """The loss scale as a device tensor, without the host sync of ``get_scale()``."""
    scale = getattr(scaler, "_scale", None)
    return scale.reshape(()) if isinstance(scale, Tensor) else None


def mark_stepped(scaler: GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Record that the guard stepped (or skipped) ``optimizer`` in place of ``scaler.step``."""
    _state(scaler, optimizer)["stage"] = OptState.STEPPED

"""Where the clip count's Gaussian noise comes from: a seeded generator or the OS's CSPRNG.

The adaptive clip adds one standard normal draw per step to its clip count. A seeded
torch generator makes runs reproducible and checkpointable; ``secure_mode`` (as in
Opacus) draws from the operating system's cryptographically secure generator
(``os.urandom`` through :class:`random.SystemRandom`) instead, and sums four draws
halved, as Opacus does for its own noise, against floating-point attacks on the
Gaussian sampler (Holohan & Braghin 2021). One scalar per step, so drawing it on the
host costs nothing and adds it to the device count as a plain number (no transfer).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from .._rng import DeviceGenerators


class SeededNormal:
    """Standard normal draws from a seeded ``torch.Generator`` per device (checkpointable)."""

    secure = False

    def __init__(self, seed: int) -> None:
        self._gens = DeviceGenerators(seed)

    def draw(self, device: torch.device) -> Tensor:
        gen = self._gens.get(device)
        return torch.randn((), generator=gen, device=device, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return self._gens.state_dict()

    def check_state(self, state: object) -> None:
        """Raise unless ``state`` is what :meth:`state_dict` returns."""
        if not isinstance(state, dict) or state.get("secure"):
            raise ValueError(
                "state_dict['rng']: saved by a secure_mode clip (no generator state); this "
                "clip is seeded: build it with secure_mode=True to resume"
            )
        seed, states = state.get("seed"), state.get("states")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"state_dict['rng']['seed'] must be an int >= 0, got {seed!r}")
        if not isinstance(states, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) and v.dtype == torch.uint8
            for k, v in states.items()
        ):
            raise ValueError(
                "state_dict['rng']['states'] must map device names to generator states "
                "(uint8 tensors)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._gens.load_state_dict(state)


class SecureNormal:
    """Standard normal draws from the OS's CSPRNG, hardened as Opacus's secure noise."""

    secure = True

    def __init__(self) -> None:
        self._source = random.SystemRandom()

    def draw(self, device: torch.device) -> float:
        del device
        return sum(self._source.gauss(0.0, 1.0) for _ in range(4)) / 2.0

    def state_dict(self) -> dict[str, Any]:
        return {"secure": True}

    def check_state(self, state: object) -> None:
        if not isinstance(state, dict) or state.get("secure") is not True:
            raise ValueError(
                "state_dict['rng']: saved by a seeded clip; this clip has secure_mode=True "
                "(its count noise has no state to restore): resume with a seeded clip, or "
                "start the secure run from this clip_norm with a fresh state"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)

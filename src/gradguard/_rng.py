"""Seeded random generators, one per device, whose states can be checkpointed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_seed(seed: object) -> int:
    """``seed`` as an int >= 0; ``None`` draws one from torch's global generator."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
    return seed


class DeviceGenerators:
    """A ``torch.Generator`` per device, each seeded with ``seed`` when first used."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gens: dict[str, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            pending = self._pending.pop(key, None)
            if pending is not None:
                gen.set_state(pending)
            else:
                gen.manual_seed(self.seed)
            self._gens[key] = gen
        return gen

    def state_dict(self) -> dict[str, Any]:
        states = {k: v.clone() for k, v in self._pending.items()}
        states.update({key: gen.get_state() for key, gen in self._gens.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._gens = {}
        self._pending = {k: v.clone() for k, v in state["states"].items()}

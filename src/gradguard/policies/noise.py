"""Annealed Gaussian gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise
Improves Learning for Very Deep Networks").

At step ``t`` (0-based, one per ``decide`` call) every gradient element gets independent
noise ``N(0, σ_t²)`` with ``σ_t² = eta / (1 + t) ** gamma``. The paper's settings are
``eta`` in {0.01, 0.3, 1.0} and ``gamma = 0.55``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _foreach
from .. import _validate as check
from .._rng import DeviceGenerators, check_seed
from ..ops import Ops
from .base import Decision, Policy, StepInputs


class GradientNoise(Policy):
    """Add annealed Gaussian noise to the gradients, as an in-place transform.

    The noise is drawn from the policy's own generator (one per device), seeded with
    ``seed``, so a run is reproducible and a resumed run draws the same noise:
    ``state_dict()`` holds the step counter and every generator's state.

    In a :func:`~gradguard.chain`, transforms run before the global scales of clipping
    policies: ``chain(ClipNorm(1.0), GradientNoise())`` decides the clip coefficient on
    the noise-free norm and then scales gradient and noise together. The guard records
    the norm after the noise in ``clipped_norm``, as for any transform.

    Args:
        eta: noise variance at step 0 (> 0).
        gamma: decay exponent of the variance (>= 0; 0 keeps it constant).
        seed: seed of the noise generators; ``None`` draws one from torch's global RNG.
    """

    def __init__(self, eta: float = 0.01, gamma: float = 0.55, seed: int | None = None) -> None:
        self.eta = check.positive("eta", eta, float32=True)
        self.gamma = check.non_negative("gamma", gamma, float32=True)
        self._rng = DeviceGenerators(check_seed(seed))
        self.step = 0

    def _config(self) -> dict[str, Any]:
        return {"eta": self.eta, "gamma": self.gamma, "seed": self.seed}

    @property
    def seed(self) -> int:
        return self._rng.seed

    def std(self, step: int) -> float:
        """The noise standard deviation at ``step``: ``sqrt(eta / (1 + step) ** gamma)``.

        Taken in logarithms, so a large ``gamma`` decays to 0 instead of overflowing.
        """
        return math.sqrt(self.eta * math.exp(-self.gamma * math.log1p(step)))

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        if xp.traced:
            raise TypeError("GradientNoise draws from torch generators: it runs with torch only")
        sigma = self.std(self.step)
        self.step += 1

        def add_noise(_params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
            for group in _foreach.groups(grads):
                self._add(group, sigma)

        return Decision(transforms=[add_noise]), state

    def _add(self, group: _foreach.Group, sigma: float) -> None:
        """One draw for the whole (device, dtype) group, split into per-tensor views."""
        tensors = group.tensors
        sizes = [t.numel() for t in tensors]
        flat = torch.randn(
            sum(sizes),
            generator=self._rng.get(group.device),
            device=group.device,
            dtype=tensors[0].dtype,
        )
        noise = [n.view_as(t) for n, t in zip(flat.split(sizes), tensors)]
        if group.use_foreach:
            torch._foreach_add_(tensors, noise, alpha=sigma)
        else:
            for t, n in zip(tensors, noise):
                t.add_(n, alpha=sigma)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": self._rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"step", "rng"} - set(state)
        if missing:
            raise KeyError(
                f"state_dict for GradientNoise lacks {sorted(missing)}; was it saved from "
                "another policy?"
            )
        self.step = check.positive_int("step", state["step"], minimum=0)
        self._rng.load_state_dict(state["rng"])

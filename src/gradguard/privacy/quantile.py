"""Adaptive per-example clipping towards a quantile (Andrew, Thakkar, McMahan, Ramaswamy
2021, "Differentially private learning with adaptive clipping").

Each step the clip norm ``C`` moves geometrically towards the ``target_quantile`` of the
per-example gradient norms::

    b̄ = (Σ_i (1[‖g_i‖ ≤ C] − 1/2) + N(0, count_noise_std²)) / m + 1/2
    C ← C · exp(−lr · (b̄ − target_quantile))

where ``m`` is the *expected* number of examples per step. The count is centred so one
example changes it by at most 1/2, which is what Theorem 1 of the paper assumes; the
gradient noise is then raised so the two releases together cost exactly the budget of
the optimizer's ``noise_multiplier`` (see :mod:`gradguard.privacy.accounting`).

Opacus's ``AdaClipDPOptimizer`` (read in 1.6, and its trackers) has problems that this
class does not repeat:

* it counts raw bits (sensitivity 1) yet splits the budget with ``(2σ_b)⁻²``, which
  holds for sensitivity 1/2, so its epsilon is optimistic; here the bits are centred;
* it divides the count by the realised batch size, which is itself private under
  Poisson sampling and zero for an empty batch; here ``m`` is the public expected size;
* it resets its counts in ``zero_grad``, so with virtual steps (``BatchMemoryManager``)
  only the last micro-batch is counted; here counts are kept until the noisy step;
* a count noise ``σ_b ≤ z/2`` gave a complex noise multiplier (opacus#757; an error there
  since), and the paper's default ``σ_b = m/20`` cannot meet it for small batches; here
  the error names both arguments and the bound, at ``attach`` time;
* an integer count made ``torch.normal`` fail (opacus#779); here counts are float64;
* ``make_private(clipping="adaptive")`` cannot pass the optimizer's required arguments
  (opacus#559); here the clip attaches to the plain optimizer ``make_private`` returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _validate as check
from .._rng import DeviceGenerators, check_seed


class AdaptiveQuantileClip:
    """A per-example clip norm that tracks a quantile of the per-example gradient norms.

    Use it on its own (:meth:`update` with each step's per-example norms) or as the clip
    norm of an Opacus ``DPOptimizer`` (:meth:`attach`).

    Args:
        initial_clip: the clip norm at step 0; ``None`` takes the optimizer's
            ``max_grad_norm`` in :meth:`attach`.
        target_quantile: the fraction of examples that should end up unclipped (0..1).
        lr: the geometric learning rate ``η_C`` (the paper uses 0.2).
        count_noise_std: s.d. of the noise on the clip count, ``σ_b``; ``None`` takes the
            paper's ``expected_batch_size / 20``.
        min_clip, max_clip: bounds on the clip norm.
        seed: seed of the count noise (reproducible runs); ``None`` draws one.
    """

    def __init__(
        self,
        initial_clip: float | None = 1.0,
        target_quantile: float = 0.5,
        lr: float = 0.2,
        count_noise_std: float | None = None,
        *,
        min_clip: float = 1e-6,
        max_clip: float = math.inf,
        seed: int | None = None,
    ) -> None:
        self.clip_norm = (
            None if initial_clip is None else check.positive("initial_clip", initial_clip)
        )
        self.target_quantile = check.in_range("target_quantile", target_quantile, 0.0, 1.0)
        self.lr = check.positive("lr", lr)
        self.count_noise_std = (
            None
            if count_noise_std is None
            else check.non_negative("count_noise_std", count_noise_std)
        )
        self.min_clip = check.positive("min_clip", min_clip)
        if not (isinstance(max_clip, (int, float)) and max_clip > self.min_clip):
            raise ValueError(
                f"max_clip must be a number > min_clip={self.min_clip}, got {max_clip!r}"
            )
        self.max_clip = float(max_clip)
        self.steps = 0
        self._rng = DeviceGenerators(check_seed(seed))
        self._attached: Any = None

    def __repr__(self) -> str:
        return (
            f"AdaptiveQuantileClip(clip_norm={self.clip_norm!r}, target_quantile="
            f"{self.target_quantile}, lr={self.lr}, count_noise_std={self.count_noise_std!r})"
        )

    # -- the update -------------------------------------------------------------------

    def noisy_unclipped_fraction(
        self, norms: Tensor, expected_size: float, count_noise_std: float | None = None
    ) -> Tensor:
        """The noisy fraction ``b̄`` of examples with norm ≤ the current clip (device, 0-d).

        ``norms`` are the step's per-example gradient norms (any number of them, also
        none); ``expected_size`` is the public expected number of examples per step.
        """
        m = check.positive("expected_size", expected_size)
        sigma_b = self._count_std(m, count_noise_std)
        clip = self._require_clip()
        norms = norms.detach().reshape(-1)
        centred = (norms <= clip).to(torch.float64).sum() - 0.5 * norms.numel()
        if sigma_b > 0:
            gen = self._rng.get(norms.device)
            noise = torch.randn((), generator=gen, device=norms.device, dtype=torch.float64)
            centred = centred + sigma_b * noise
        return centred / m + 0.5

    def update(
        self, norms: Tensor, expected_size: float, count_noise_std: float | None = None
    ) -> float:
        """Take one step of the clip norm from this step's per-example ``norms``.

        Returns the new clip norm (one host read of the noisy count per step).
        """
        fraction = float(self.noisy_unclipped_fraction(norms, expected_size, count_noise_std))
        return self._step(fraction)

    def _step(self, fraction: float) -> float:
        clip = self._require_clip() * math.exp(-self.lr * (fraction - self.target_quantile))
        self.clip_norm = min(max(clip, self.min_clip), self.max_clip)
        self.steps += 1
        return self.clip_norm

    def _count_std(self, expected_size: float, override: float | None) -> float:
        if override is not None:
            return override
        if self.count_noise_std is not None:
            return self.count_noise_std
        return expected_size / 20.0

    def _require_clip(self) -> float:
        if self.clip_norm is None:
            raise ValueError(
                "initial_clip: no clip norm yet; give initial_clip or attach() to an optimizer "
                "whose max_grad_norm is the starting value"
            )
        return self.clip_norm

    # -- Opacus -----------------------------------------------------------------------

    def attach(self, optimizer: Any, monitor: Any = None, model: Any = None) -> Any:
        """Drive the clip norm of an Opacus ``DPOptimizer``; see :mod:`.opacus`.

        ``monitor`` (a :class:`~gradguard.privacy.PerSampleMonitor`) records the
        per-example norms of each step, with parameter names from ``model``.
        """
        from .opacus import attach_quantile_clip

        return attach_quantile_clip(self, optimizer, monitor, model)

    def detach(self) -> None:
        """Give the optimizer back its own clipping and noise (the clip norm stays)."""
        if self._attached is not None:
            self._attached.detach()
            self._attached = None

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "steps": self.steps, "rng": self._rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"clip_norm", "steps", "rng"} - set(state)
        if missing:
            raise KeyError(f"state_dict for AdaptiveQuantileClip lacks {sorted(missing)}")
        self.clip_norm = state["clip_norm"]
        self.steps = int(state["steps"])
        self._rng.load_state_dict(state["rng"])
        if self._attached is not None and self.clip_norm is not None:
            self._attached.optimizer.max_grad_norm = self.clip_norm

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
  (opacus#559); here the clip attaches to the plain optimizer ``make_private`` returns;
* its count noise ignores ``secure_mode``; here ``secure_mode=True`` draws it from the
  operating system's CSPRNG (:mod:`.count_noise`).

The geometric step is taken in log space and bounded by ``[min_clip, max_clip]`` before
it is exponentiated, so no learning rate or noise draw can overflow it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _validate as check
from .._rng import check_seed
from .count_noise import SecureNormal, SeededNormal
from .opacus import AttachedClip, attach_quantile_clip

#: Bounds the clip norm when ``max_clip`` is infinite (its exp cannot overflow).
_LARGEST = 1e300
#: Bounds the noisy fraction, far beyond any value a sane count noise gives.
_FRACTION_BOUND = 1e12


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
        secure_mode: draw the count noise from the operating system's CSPRNG (not
            reproducible, no seed); required when the optimizer has ``secure_mode=True``.
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
        secure_mode: bool = False,
    ) -> None:
        self.target_quantile = check.in_range("target_quantile", target_quantile, 0.0, 1.0)
        self.lr = check.positive("lr", lr)
        self.count_noise_std = (
            None
            if count_noise_std is None
            else check.non_negative("count_noise_std", count_noise_std)
        )
        self.min_clip = check.positive("min_clip", min_clip)
        if isinstance(max_clip, bool) or not (
            isinstance(max_clip, (int, float)) and max_clip > self.min_clip
        ):
            raise ValueError(
                f"max_clip must be a number > min_clip={self.min_clip}, got {max_clip!r}"
            )
        self.max_clip = float(max_clip)
        self.clip_norm = (
            None if initial_clip is None else self.checked_clip_norm("initial_clip", initial_clip)
        )
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
        if secure_mode and seed is not None:
            raise ValueError(
                "seed: secure_mode=True draws the count noise from the operating system's "
                "CSPRNG, which takes no seed (Opacus refuses a seeded generator in secure "
                "mode too); give seed=None"
            )
        self.secure_mode = secure_mode
        self._noise = SecureNormal() if secure_mode else SeededNormal(check_seed(seed))
        self.steps = 0
        self._attached: AttachedClip | None = None

    def __repr__(self) -> str:
        return (
            f"AdaptiveQuantileClip(clip_norm={self.clip_norm!r}, target_quantile="
            f"{self.target_quantile}, lr={self.lr}, count_noise_std={self.count_noise_std!r})"
        )

    def checked_clip_norm(self, name: str, value: object) -> float:
        """``value`` as a clip norm within ``[min_clip, max_clip]``, or an error naming ``name``."""
        clip = check.positive(name, value)
        if not self.min_clip <= clip <= self.max_clip:
            raise ValueError(
                f"{name} must lie in [min_clip, max_clip] = [{self.min_clip:g}, "
                f"{self.max_clip:g}], got {clip:g}"
            )
        return clip

    # -- the update -------------------------------------------------------------------

    def noisy_unclipped_fraction(
        self, norms: Tensor, expected_size: float, count_noise_std: float | None = None
    ) -> Tensor:
        """The noisy fraction ``b̄`` of examples with norm ≤ the current clip (device, 0-d).

        ``norms`` are the step's per-example gradient norms (any number of them, also
        none; a NaN norm counts as clipped); ``expected_size`` is the public expected
        number of examples per step; ``count_noise_std`` overrides the clip's ``σ_b``.
        """
        m = check.positive("expected_size", expected_size)
        sigma_b = self.count_std(m, count_noise_std)
        clip = self._require_clip()
        if not isinstance(norms, Tensor) or norms.is_complex() or not norms.is_floating_point():
            kind = norms.dtype if isinstance(norms, Tensor) else type(norms).__name__
            raise TypeError(f"norms must be a real floating-point tensor, got {kind}")
        norms = norms.detach().reshape(-1)
        centred = (norms <= clip).to(torch.float64).sum() - 0.5 * norms.numel()
        if sigma_b > 0:
            centred = centred + sigma_b * self._noise.draw(norms.device)
        # bounded so that no count noise, however large, overflows (post-processing)
        return (centred / m + 0.5).clamp(-_FRACTION_BOUND, _FRACTION_BOUND)

    def update(
        self, norms: Tensor, expected_size: float, count_noise_std: float | None = None
    ) -> float:
        """Take one step of the clip norm from this step's per-example ``norms``.

        Returns the new clip norm (one host read of the noisy count per step).
        """
        fraction = self.noisy_unclipped_fraction(norms, expected_size, count_noise_std)
        return self.update_from_fraction(float(fraction))

    def update_from_fraction(self, fraction: float) -> float:
        """Take one step from a noisy unclipped fraction ``b̄`` (a released value).

        ``C ← C · exp(−lr · (b̄ − target_quantile))``, bounded to ``[min_clip, max_clip]``
        in log space, so it never overflows. Returns the new clip norm.
        """
        b = check.finite("fraction", fraction)
        clip = self._require_clip()
        ceiling = min(self.max_clip, _LARGEST)
        log_clip = math.log(clip) - self.lr * (b - self.target_quantile)
        if log_clip <= math.log(self.min_clip):
            self.clip_norm = self.min_clip
        elif log_clip >= math.log(ceiling):
            self.clip_norm = ceiling
        else:
            self.clip_norm = min(max(math.exp(log_clip), self.min_clip), ceiling)
        self.steps += 1
        return self.clip_norm

    def count_std(self, expected_size: float, override: float | None = None) -> float:
        """The count noise s.d. ``σ_b`` in force: ``override``, the clip's, or ``m / 20``."""
        if override is not None:
            return check.non_negative("count_noise_std", override)
        if self.count_noise_std is not None:
            return self.count_noise_std
        return check.positive("expected_size", expected_size) / 20.0

    def _require_clip(self) -> float:
        if self.clip_norm is None:
            raise ValueError(
                "initial_clip: no clip norm yet; give initial_clip or attach() to an optimizer "
                "whose max_grad_norm is the starting value"
            )
        return self.clip_norm

    # -- Opacus -----------------------------------------------------------------------

    def attach(self, optimizer: Any, monitor: Any = None, model: Any = None) -> AttachedClip:
        """Drive the clip norm of an Opacus ``DPOptimizer``; see :mod:`.opacus`.

        ``monitor`` (a :class:`~gradguard.privacy.PerSampleMonitor`) records each step's
        noised clip count (and, only if it was built to release them, exact per-example
        statistics), with parameter names from ``model``.
        """
        return attach_quantile_clip(self, optimizer, monitor, model)

    def detach(self) -> None:
        """Give the optimizer back its own clipping and noise (the clip norm stays)."""
        if self._attached is not None:
            self._attached.detach()
            self._attached = None

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "steps": self.steps, "rng": self._noise.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every entry is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        missing = {"clip_norm", "steps", "rng"} - set(state)
        if missing:
            raise KeyError(f"state_dict for AdaptiveQuantileClip lacks {sorted(missing)}")
        clip = state["clip_norm"]
        if clip is not None:
            clip = self.checked_clip_norm("state_dict['clip_norm']", clip)
        elif self._attached is not None:
            raise ValueError("state_dict['clip_norm']: None, but this clip drives an optimizer")
        steps = check.positive_int("state_dict['steps']", state["steps"], minimum=0)
        self._noise.check_state(state["rng"])
        self._noise.load_state_dict(state["rng"])
        self.clip_norm, self.steps = clip, steps
        if self._attached is not None:
            self._attached.optimizer.max_grad_norm = clip

"""Attach an :class:`~gradguard.privacy.AdaptiveQuantileClip` (and a per-example monitor)
to an Opacus optimizer.

Works on the plain ``DPOptimizer`` that ``PrivacyEngine.make_private(clipping="flat")``
returns, so no Opacus argument plumbing is needed (opacus#559). Per step:

1. ``clip_and_accumulate`` (once per micro-batch): everything that could fail is checked
   first (the noise multiplier in force, the clip norm nobody else changed), then the
   per-example norms of the fresh ``grad_sample`` are measured and Opacus clips at the
   current ``max_grad_norm`` as usual;
2. ``add_noise`` (once per real step): the noisy clip count is drawn, Opacus adds its
   noise with the *gradient* noise multiplier ``σ_Δ`` (see
   :func:`~gradguard.privacy.accounting.gradient_noise_multiplier`), and
   ``optimizer.noise_multiplier`` is put back to the budget ``z`` before the accountant's
   step hook reads it; then the noisy count moves the clip norm, which becomes
   ``optimizer.max_grad_norm`` for the next step. A monitor receives the same noisy
   count, already on the host: recording it costs no privacy and no transfer.

``z`` is read from ``optimizer.noise_multiplier`` at every step, so an Opacus noise
scheduler (``ExponentialNoise``, ``StepNoise``, ``LambdaNoise``), attached before or after
the clip, schedules the noise actually added, and the accountant records the ``z`` of
each step. A step whose ``z`` the count noise cannot carry (``count_noise_std <= z/2``)
fails before anything is written. A gradient-clip scheduler is refused at the next step:
only one of them can set ``max_grad_norm``.

So ``privacy_engine.get_epsilon(delta)`` is the epsilon of ``z``, and it is honest: the
gradient noise and the count noise together cost exactly the budget of ``z``. The
price is gradient noise ``σ_Δ > z``; :attr:`AttachedClip.gradient_noise_multiplier`
says how much. Cost: one extra per-example norm pass per micro-batch (Opacus computes
its own inside ``clip_and_accumulate``) and one host read of the noisy count per step.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from .. import _validate as check
from .accounting import gradient_noise_multiplier
from .per_sample import PerSampleNorms, norms_of


class _Clip(Protocol):
    """What :class:`AttachedClip` uses of an ``AdaptiveQuantileClip``."""

    clip_norm: float | None
    steps: int
    secure_mode: bool
    _attached: Any

    def count_std(self, expected_size: float, override: float | None = None) -> float: ...
    def noisy_unclipped_fraction(
        self, norms: Tensor, expected_size: float, count_noise_std: float | None = None
    ) -> Tensor: ...
    def update_from_fraction(self, fraction: float) -> float: ...
    def checked_clip_norm(self, name: str, value: object) -> float: ...


class AttachedClip:
    """The link between an ``AdaptiveQuantileClip`` and one ``DPOptimizer``."""

    def __init__(self, clip: _Clip, optimizer: Any, monitor: Any = None, model: Any = None) -> None:
        # every check before anything changes, so a refused attach leaves both as they were
        expected = check.positive("optimizer.expected_batch_size", _expected(optimizer))
        count_std = clip.count_std(expected)
        gradient_noise_multiplier(_budget(optimizer), count_std)  # raises when too small
        start = clip.clip_norm
        if start is None:
            start = clip.checked_clip_norm("optimizer.max_grad_norm", optimizer.max_grad_norm)
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise TypeError(
                f"monitor must be a PerSampleMonitor (with observe()), got {type(monitor).__name__}"
            )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.clip = clip
        self.optimizer = optimizer
        self.monitor = monitor
        self.count_noise_std = count_std
        clip.clip_norm = start
        optimizer.max_grad_norm = start
        self._parts: list[PerSampleNorms] = []
        self._names = _names(optimizer, model)
        self._clip_and_accumulate = optimizer.clip_and_accumulate
        self._add_noise = optimizer.add_noise
        optimizer.clip_and_accumulate = self._on_clip
        optimizer.add_noise = self._on_noise

    @property
    def noise_multiplier(self) -> float:
        """The budget ``z`` in force: ``optimizer.noise_multiplier``, what the accountant reads."""
        return _budget(self.optimizer)

    @property
    def gradient_noise_multiplier(self) -> float:
        """``σ_Δ``: the multiplier of the noise added to the gradients for the current ``z``."""
        return gradient_noise_multiplier(self.noise_multiplier, self.count_noise_std)

    def detach(self) -> None:
        """Restore the optimizer's own methods."""
        self.optimizer.__dict__.pop("clip_and_accumulate", None)
        self.optimizer.__dict__.pop("add_noise", None)

    def _check(self) -> tuple[float, float]:
        """``(z, σ_Δ)`` for this step, or an error before anything is written."""
        clip = self.clip.clip_norm
        if self.optimizer.max_grad_norm != clip:
            raise RuntimeError(
                f"optimizer.max_grad_norm was set to {self.optimizer.max_grad_norm!r} while an "
                f"AdaptiveQuantileClip drives it (its clip norm is {clip!r}): a gradient-clip "
                "scheduler or another writer cannot share it; detach() the clip first"
            )
        z = self.noise_multiplier
        return z, gradient_noise_multiplier(z, self.count_noise_std)

    def _on_clip(self) -> None:
        self._check()
        optimizer = self.optimizer
        grads = [optimizer._get_flat_grad_sample(p) for p in optimizer.params]
        self._parts.append(norms_of(grads, self._names))
        self._clip_and_accumulate()

    def _on_noise(self) -> None:
        optimizer = self.optimizer
        z, sigma = self._check()
        clip_used = float(optimizer.max_grad_norm)
        parts, self._parts = self._parts, []
        norms = PerSampleNorms.cat(parts) if parts else None
        fraction = None
        if norms is not None:
            expected = _expected(optimizer) * optimizer.accumulated_iterations
            fraction = self.clip.noisy_unclipped_fraction(
                norms.total, expected, self.count_noise_std
            )
        optimizer.noise_multiplier = sigma
        try:
            self._add_noise()
        finally:
            optimizer.noise_multiplier = z
        if norms is None or fraction is None:
            return
        released = float(fraction)  # the step's one host read
        step = self.clip.steps
        optimizer.max_grad_norm = self.clip.update_from_fraction(released)
        if self.monitor is not None:
            self.monitor.observe(
                step, norms, clip_used, noisy_unclipped_fraction=released, expected_size=expected
            )


def _budget(optimizer: Any) -> float:
    return check.non_negative("optimizer.noise_multiplier", optimizer.noise_multiplier)


def _expected(optimizer: Any) -> float:
    expected = optimizer.expected_batch_size
    if expected is None:
        raise ValueError(
            "optimizer: expected_batch_size is unknown; the clip count is normalised by "
            "the public expected batch size (never the realised one, which is private)"
        )
    return expected


def _names(optimizer: Any, model: Any) -> tuple[str, ...]:
    """Parameter names in the optimizer's order, from ``model`` where given."""
    known: dict[int, str] = {}
    if model is not None:
        known = {id(p): n.removeprefix("_module.") for n, p in model.named_parameters()}
    return tuple(known.get(id(p), f"parameters[{i}]") for i, p in enumerate(optimizer.params))


def attach_quantile_clip(
    clip: _Clip, optimizer: Any, monitor: Any = None, model: Any = None
) -> AttachedClip:
    """Make ``clip`` drive ``optimizer.max_grad_norm``; see the module docstring.

    Raises for optimizers other than Opacus's flat ``DPOptimizer`` (per-layer,
    distributed, ghost clipping and Opacus's own adaptive optimizer clip differently),
    for a ``secure_mode`` optimizer with a clip whose count noise is not secure, and when
    the count noise is too small for the budget (opacus#757).
    """
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:
        raise ImportError("AdaptiveQuantileClip.attach needs Opacus: pip install opacus") from None
    if type(optimizer) is not DPOptimizer:
        raise TypeError(
            f"optimizer must be Opacus's flat-clipping DPOptimizer (make_private with "
            f"clipping='flat'), got {type(optimizer).__name__}"
        )
    if optimizer.secure_mode and not clip.secure_mode:
        raise ValueError(
            "optimizer: secure_mode=True draws Opacus's noise from a secure generator; build "
            "the clip with AdaptiveQuantileClip(..., secure_mode=True) (and no seed) so its "
            "count noise is drawn securely too"
        )
    if "clip_and_accumulate" in optimizer.__dict__:
        raise ValueError("optimizer: a clip is already attached to this optimizer")
    if clip._attached is not None:
        raise ValueError("clip: already attached to an optimizer; detach() it first")
    attached = AttachedClip(clip, optimizer, monitor, model)
    clip._attached = attached
    return attached

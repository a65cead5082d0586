"""Attach an :class:`AdaptiveQuantileClip` (and a per-example monitor) to an Opacus optimizer.

Works on the plain ``DPOptimizer`` that ``PrivacyEngine.make_private(clipping="flat")``
returns, so no Opacus argument plumbing is needed (opacus#559). Per step:

1. ``clip_and_accumulate`` (once per micro-batch): the per-example norms of the fresh
   ``grad_sample`` are measured, their centred clip count kept on the device, then
   Opacus clips at the current ``max_grad_norm`` as usual;
2. ``add_noise`` (once per real step): Opacus adds its noise with the *gradient* noise
   multiplier ``σ_Δ`` (see :func:`~gradguard.privacy.accounting.gradient_noise_multiplier`),
   and ``optimizer.noise_multiplier`` is put back to the budget ``z`` before the
   accountant's step hook reads it; then the noisy count moves the clip norm, which
   becomes ``optimizer.max_grad_norm`` for the next step.

So ``privacy_engine.get_epsilon(delta)`` is the epsilon of ``z``, and it is honest: the
gradient noise and the count noise together cost exactly the budget of ``z``. The
price is gradient noise ``σ_Δ > z``; :attr:`AttachedClip.gradient_noise_multiplier`
says how much. Cost: one extra per-example norm pass per micro-batch (Opacus computes
its own inside ``clip_and_accumulate``) and one host read of the noisy count per step.
"""

from __future__ import annotations

from typing import Any

from .accounting import gradient_noise_multiplier
from .per_sample import PerSampleNorms, norms_of
from .quantile import AdaptiveQuantileClip


class AttachedClip:
    """The link between an :class:`AdaptiveQuantileClip` and one ``DPOptimizer``."""

    def __init__(
        self, clip: AdaptiveQuantileClip, optimizer: Any, monitor: Any = None, model: Any = None
    ) -> None:
        self.clip = clip
        self.optimizer = optimizer
        self.monitor = monitor
        self.noise_multiplier = float(optimizer.noise_multiplier)
        expected = optimizer.expected_batch_size
        if expected is None or expected <= 0:
            raise ValueError(
                "optimizer: expected_batch_size is unknown; the clip count is normalised by "
                "the public expected batch size (never the realised one, which is private)"
            )
        self.count_noise_std = (
            clip.count_noise_std if clip.count_noise_std is not None else expected / 20.0
        )
        self.gradient_noise_multiplier = gradient_noise_multiplier(
            self.noise_multiplier, self.count_noise_std
        )
        if clip.clip_norm is None:
            clip.clip_norm = float(optimizer.max_grad_norm)
        optimizer.max_grad_norm = clip.clip_norm
        self._parts: list[PerSampleNorms] = []
        self._names = _names(optimizer, model)
        self._clip_and_accumulate = optimizer.clip_and_accumulate
        self._add_noise = optimizer.add_noise
        optimizer.clip_and_accumulate = self._on_clip
        optimizer.add_noise = self._on_noise

    def detach(self) -> None:
        """Restore the optimizer's own methods."""
        self.optimizer.__dict__.pop("clip_and_accumulate", None)
        self.optimizer.__dict__.pop("add_noise", None)

    def _on_clip(self) -> None:
        optimizer = self.optimizer
        grads = [optimizer._get_flat_grad_sample(p) for p in optimizer.params]
        self._parts.append(norms_of(grads, self._names))
        self._clip_and_accumulate()

    def _on_noise(self) -> None:
        optimizer = self.optimizer
        clip_used = float(optimizer.max_grad_norm)
        optimizer.noise_multiplier = self.gradient_noise_multiplier
        try:
            self._add_noise()
        finally:
            optimizer.noise_multiplier = self.noise_multiplier
        norms = PerSampleNorms.cat(self._parts) if self._parts else None
        self._parts = []
        if norms is None:
            return
        if self.monitor is not None:
            self.monitor.observe(self.clip.steps, norms, clip_used)
        expected = optimizer.expected_batch_size * optimizer.accumulated_iterations
        optimizer.max_grad_norm = self.clip.update(norms.total, expected, self.count_noise_std)


def _names(optimizer: Any, model: Any) -> tuple[str, ...]:
    """Parameter names in the optimizer's order, from ``model`` where given."""
    known: dict[int, str] = {}
    if model is not None:
        known = {id(p): n.removeprefix("_module.") for n, p in model.named_parameters()}
    return tuple(known.get(id(p), f"parameters[{i}]") for i, p in enumerate(optimizer.params))


def attach_quantile_clip(
    clip: AdaptiveQuantileClip, optimizer: Any, monitor: Any = None, model: Any = None
) -> AttachedClip:
    """Make ``clip`` drive ``optimizer.max_grad_norm``; see the module docstring.

    Raises for optimizers other than Opacus's flat ``DPOptimizer`` (per-layer,
    distributed, ghost clipping and Opacus's own adaptive optimizer clip differently),
    for ``secure_mode`` (the count noise is plain ``torch.randn``), and when the count
    noise is too small for the budget (opacus#757).
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
    if optimizer.secure_mode:
        raise ValueError(
            "optimizer: secure_mode=True is not supported; the clip count noise is drawn "
            "with torch.randn, not Opacus's secure sampler"
        )
    if "clip_and_accumulate" in optimizer.__dict__:
        raise ValueError("optimizer: a clip is already attached to this optimizer")
    if clip._attached is not None:
        raise ValueError("clip: already attached to an optimizer; detach() it first")
    attached = AttachedClip(clip, optimizer, monitor, model)
    clip._attached = attached
    return attached

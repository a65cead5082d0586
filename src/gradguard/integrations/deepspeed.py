"""DeepSpeed: guard (or monitor) the gradients of an engine, through the engine itself.

:meth:`DeepSpeedGuard.step` replaces ``engine.step()``. At an accumulation boundary it
assembles each parameter's full gradient with DeepSpeed's ``safe_get_full_grad`` (a
collective under ZeRO: every rank calls it, in the same order, and every rank gets the
same numbers, so every rank takes the same decision), divides out the fp16 loss scale
the gradients still carry, and runs the policy on them; then it lets the engine act:

- **clipping**: the policy's threshold becomes the engine's clip value for this step
  (``clip_grad`` of DeepSpeed's optimizer; ``gradient_clipping`` of its config without
  ZeRO or mixed precision), and DeepSpeed clips with its own norm by the coefficient
  ``min(1, threshold / (norm + 1e-6))``, torch's. So policies that clip the global norm
  (``ClipNorm``, ``ZClip``, ``AutoClip``) work; element-wise and per-tensor ones
  (``ClipValue``, ``AGC``, ``ClipTensorNorm``, ``AdaptiveTensorClip``,
  ``GradientNoise``) are refused: DeepSpeed's partitions are not reachable in place
  without patching its internals.
- **skipping**: through DeepSpeed's own overflow path: the step is not applied,
  ``engine.was_step_applied()`` is False, ``engine.skipped_steps`` counts it and the
  learning-rate scheduler holds (``lr_on_skip="hold"``, as on an fp16 overflow;
  ``"advance"`` steps it anyway). Where the gradients are finite, one parameter's gradient
  is set to NaN with DeepSpeed's ``safe_set_full_grad`` so that its overflow check fires;
  under fp16 the dynamic loss scaler's state is kept as it was, since the skip is not an
  overflow. Without ZeRO or mixed precision (a plain torch optimizer, which DeepSpeed
  never skips) the gradients are withheld from the optimizer for the step instead.

Monitoring (the default while the config sets ``gradient_clipping`` and no policy is
given) changes nothing: DeepSpeed clips, gradguard records the pre-clip norm with
DeepSpeed's threshold and coefficient, and the steps DeepSpeed itself skips (non-finite
gradients) are recorded as skips. Step numbers are ``engine.global_steps`` after the step.
Assembling full gradients costs memory and, under ZeRO, communication of the gradients
once more per step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

try:
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
except ImportError as error:
    raise ImportError(
        "gradguard.integrations.deepspeed needs DeepSpeed: pip install 'gradguard[deepspeed]'"
    ) from error

import torch

from .. import _validate as check
from .. import _warn
from .._update import learning_rate
from ..guard import Guard, StepResult
from ..policies import (
    AGC,
    AdaptiveTensorClip,
    Chain,
    ClipNorm,
    ClipTensorNorm,
    ClipValue,
    GradientNoise,
    Policy,
    SkipNonFinite,
    chain,
)
from ..schema import Sink
from ._core import LossWindow, check_lr_on_skip, check_modes, resolve_policy

_IN_PLACE = (AGC, AdaptiveTensorClip, ClipTensorNorm, ClipValue, GradientNoise)


class DeepSpeedGuard:
    """Guard a ``DeepSpeedEngine``'s steps; call :meth:`step` in place of ``engine.step()``.

    Args:
        engine: the engine returned by ``deepspeed.initialize``.
        policy: gradguard's policy; given, it clips and skips in place of the config's
            ``gradient_clipping``.
        monitor_only: only record. ``None`` (default): monitor while the config clips
            and no policy is given, guard otherwise (``gradient_clipping`` then becomes
            ``chain(SkipNonFinite(), ClipNorm(gradient_clipping))``).
        lr_on_skip: ``"hold"`` (default) or ``"advance"`` the engine's scheduler on a skip.
        norm_type: the p-norm measured (2 when gradguard clips: DeepSpeed's norm).
        measure_every: when monitoring, measure every n-th optimizer step only.
        store, sinks, log_every, health, recorder: recording, as for
            :class:`~gradguard.Guard` (rank 0 records).
    """

    def __init__(
        self,
        engine: Any,
        policy: Policy | None = None,
        *,
        monitor_only: bool | None = None,
        lr_on_skip: str = "hold",
        norm_type: float | str = 2.0,
        measure_every: int = 1,
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        health: Any = True,
        recorder: Any = None,
    ) -> None:
        for attribute in ("step", "module", "optimizer", "is_gradient_accumulation_boundary"):
            if not hasattr(engine, attribute):
                raise TypeError(
                    f"engine must be a DeepSpeedEngine (from deepspeed.initialize), "
                    f"got {type(engine).__name__}"
                )
        policy, monitor_only = check_modes(policy, monitor_only)
        self.lr_on_skip = check_lr_on_skip(lr_on_skip)
        self.measure_every = check.positive_int("measure_every", measure_every)
        self.engine = engine
        optimizer = engine.optimizer
        self._plain = not hasattr(optimizer, "overflow")  # a torch optimizer: never skipped
        self._checks_overflow = not self._plain and (
            bool(getattr(optimizer, "check_grad_overflow", True))
            or getattr(optimizer, "dtype", None) != torch.bfloat16
        )
        clip = float(engine.gradient_clipping() or 0.0)
        framework = ClipNorm(clip) if clip > 0 else None
        guarding = not monitor_only and (policy is not None or monitor_only is False or not clip)
        if guarding:
            _check_acts_globally(policy)
            if check.norm_type(norm_type) != 2.0:
                raise ValueError(
                    f"norm_type must be 2 when gradguard clips through DeepSpeed (its norm), "
                    f"got {norm_type!r}"
                )
            if measure_every != 1:
                raise ValueError("measure_every: a guard decides every step; it must be 1")
        policy, self.monitoring = resolve_policy(
            policy, monitor_only, framework, f"gradient_clipping={clip:g}"
        )
        if self._checks_overflow and not _skips_nonfinite(policy):
            policy = chain(SkipNonFinite(), policy)  # DeepSpeed skips those steps itself
        self.guard = Guard(
            engine.module,
            policy,
            norm_type=norm_type,
            store=store,
            sinks=sinks,
            log_every=log_every,
            recorder=recorder,
            health=health,
        )
        self.policy = policy
        self._losses = LossWindow(mean=True)
        self._boundaries = 0
        self._clip_was = (clip, getattr(optimizer, "clip_grad", None))
        self._warned = False
        self.last_result: StepResult | None = None

    # -- the step --------------------------------------------------------------------

    def step(self, *, loss: torch.Tensor | float | None = None) -> StepResult | None:
        """Use in place of ``engine.step()``. Returns the step's result at measured steps.

        ``loss``: this micro-batch's loss; the mean over the step's micro-batches is recorded.
        """
        self._losses.add(loss)
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        count, self._boundaries = self._boundaries, self._boundaries + 1
        if self.monitoring and count % self.measure_every:
            self._losses.take()
            engine.step()
            return None
        result = self._decide()
        skip = result.is_skipped()
        if self.monitoring:
            engine.step()
        else:
            with self._acting(result, skip):
                engine.step()
        self._check_applied(result, skip)
        if skip and self.lr_on_skip == "advance" and getattr(engine, "lr_scheduler", None):
            engine.lr_scheduler.step()
        self.last_result = result
        return result

    def _decide(self) -> StepResult:
        engine = self.engine
        grads = [safe_get_full_grad(p) for p in self.guard.params]  # a collective under ZeRO
        scale = _grad_scale(engine)
        found_inf = None
        if scale is not None:
            grads = [None if g is None else g / scale for g in grads]
        if engine.fp16_enabled():  # DeepSpeed skips these as fp16 overflows
            present = [g for g in grads if g is not None]
            found_inf = torch.stack([~torch.isfinite(g).all() for g in present]).any().float()
        groups = getattr(engine.optimizer, "param_groups", None)
        result = self.guard.process(
            grads=grads,
            loss=self._losses.take(),
            lr=learning_rate(engine.optimizer) if groups else None,
            step=engine.global_steps + 1,
            found_inf=found_inf,
            loss_scale=scale,
            defer_scale=True,  # DeepSpeed applies the clip
        )
        decision = result.decision
        if decision.transforms or decision.tensor_scale is not None:
            raise NotImplementedError(
                f"policy: {self.policy!r} transforms gradients element-wise or per tensor, "
                "which DeepSpeed's partitioned gradients do not allow; use a global clip"
            )
        return result

    @contextlib.contextmanager
    def _acting(self, result: StepResult, skip: bool) -> Iterator[None]:
        """The engine's clip value, and its overflow path for a skip, for one step."""
        engine, optimizer = self.engine, self.engine.optimizer
        threshold = float(result.threshold)
        clip = threshold if math.isfinite(threshold) and not skip else 0.0
        undo: list[Any] = []
        if self._plain:
            engine._config.gradient_clipping = clip
        else:
            optimizer.clip_grad = clip
        if skip and self._plain:
            for param in self.guard.params:
                param.grad = None  # the optimizer then leaves every parameter as it is
            optimizer.overflow = True  # read by the engine: the step counts as skipped
            undo.append(lambda: vars(optimizer).pop("overflow", None))
        elif skip:
            finite = math.isfinite(float(result.total_norm))
            if getattr(optimizer, "check_grad_overflow", None) is False:
                optimizer.check_grad_overflow = True
                undo.append(lambda: setattr(optimizer, "check_grad_overflow", False))
            if finite:
                self._poison()
                scaler = _loss_scaler(optimizer) if engine.fp16_enabled() else None
                if scaler is not None:  # a skip is no overflow: the loss scale stays
                    saved = dict(vars(scaler))
                    undo.append(lambda: vars(scaler).update(saved))
        try:
            yield
        finally:
            for action in reversed(undo):
                action()

    def _poison(self) -> None:
        """Make DeepSpeed's overflow check fire: one gradient becomes NaN, on every rank."""
        for param in self.guard.params:
            grad = safe_get_full_grad(param)
            if grad is not None:
                safe_set_full_grad(param, torch.full_like(grad, math.nan))
                return

    def _check_applied(self, result: StepResult, skip: bool) -> None:
        applied = getattr(self.engine, "was_step_applied", None)
        if applied is None or applied() != skip or self._warned:
            return
        self._warned = True
        what = "applied a step gradguard skipped" if skip else "skipped a step on its own"
        _warn.warn(f"gradguard: DeepSpeed {what} (step {result.step}); please report this")

    # -- the rest --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The guard's state (policy and step counter), for checkpoints."""
        return self.guard.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.guard.load_state_dict(state)

    def close(self) -> None:
        """Give the engine its clip value back; flush and close the recorder, if any."""
        clip, clip_grad = self._clip_was
        if not self.monitoring:
            if self._plain:
                self.engine._config.gradient_clipping = clip
            elif clip_grad is not None:
                self.engine.optimizer.clip_grad = clip_grad
        self.guard.close()


class DeepSpeedMonitor(DeepSpeedGuard):
    """:class:`DeepSpeedGuard` that only records: DeepSpeed keeps clipping and stepping."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        super().__init__(engine, monitor_only=True, **kwargs)


def _grad_scale(engine: Any) -> float | None:
    """The loss scale the assembled gradients still carry (``None`` when there is none).

    DeepSpeed's engine scales the loss for ZeRO optimizers (``scale_if_loss``) and for
    torch autocast's GradScaler; the stage-0 fp16 optimizers receive unscaled gradients.
    """
    optimizer = engine.optimizer
    if isinstance(optimizer, ZeROOptimizer):
        scale = float(optimizer.loss_scale)
    elif getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        scale = float(engine.torch_autocast_z0_gradscaler.get_scale())
    else:
        return None
    return scale if scale != 1.0 else None


def _loss_scaler(optimizer: Any) -> Any:
    """DeepSpeed's dynamic loss-scale state of ``optimizer`` (ZeRO, or stage-0 fp16)."""
    return getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)


def _policies(policy: Policy) -> Iterator[Policy]:
    yield policy
    if isinstance(policy, Chain):
        for inner in policy.policies:
            yield from _policies(inner)


def _check_acts_globally(policy: Policy | None) -> None:
    if policy is None:
        return
    for inner in _policies(policy):
        if isinstance(inner, _IN_PLACE):
            raise NotImplementedError(
                f"policy: {type(inner).__name__} transforms gradients element-wise or per "
                "tensor, which DeepSpeed's partitioned gradients do not allow; use a global "
                "clip (ClipNorm, ZClip, AutoClip) or monitor_only=True"
            )


def _skips_nonfinite(policy: Policy) -> bool:
    return any(isinstance(inner, SkipNonFinite) for inner in _policies(policy))

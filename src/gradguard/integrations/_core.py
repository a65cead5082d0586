"""What every framework integration shares: one rule for modes, losses and skipped steps.

Frameworks call ``optimizer.step()`` themselves, so an integration cannot hand the
optimizer to :meth:`Guard.step`. :class:`HookStep` calls :meth:`Guard.process` (measure,
decide, clip in place, record) at the framework's hook instead. When the guard skips,
the real step that the framework takes next must change nothing. Zeroing the gradients
would not do: Adam would still count the step and decay its moments. Instead the
gradients of every parameter of the optimizer are set aside (``grad = None``): torch
optimizers leave a parameter without a gradient untouched (no update, no state change,
no step count), and fused and foreach kernels are handed empty lists. The gradients come
back after the step through an optimizer step post-hook, so they can still be inspected.

**Modes** (:func:`resolve_policy`, the same in every integration). A framework that clips
on its own (``max_grad_norm``, ``gradient_clip_val``, DeepSpeed's ``gradient_clipping``)
keeps doing so while gradguard only monitors; gradguard then records the norm measured
*before* that clip, with the framework's threshold and coefficient. Given a policy (or
``monitor_only=False``), gradguard takes over: the framework's clip is turned off, and
without a policy of the user's its threshold becomes ``ClipNorm(threshold)`` after a
non-finite skip, so what is clipped does not change.

**Skipped steps and the learning rate** (``lr_on_skip``). A skipped step counts in the
framework's step counter, as an fp16 overflow does, and leaves parameters and optimizer
state untouched. By default (``"hold"``) the learning-rate schedule does not move either:
it counts updates, which is what Hugging Face, Accelerate and DeepSpeed already do on an
fp16 overflow, and a skipped step is then exactly a step that never happened.
``"advance"`` keeps the schedule on the framework's step count instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _warn
from .._update import learning_rate, sgd_step_gain, warn_if_private
from ..guard import Guard, StepResult
from ..policies import Chain, ClipNorm, Monitor, Policy, SkipNonFinite, chain, default_policy
from ..schema import Sink

LR_RULES = ("hold", "advance")


def check_lr_on_skip(value: object) -> str:
    """Validate ``lr_on_skip``: ``"hold"`` or ``"advance"``."""
    if value not in LR_RULES:
        raise ValueError(f"lr_on_skip must be 'hold' or 'advance', got {value!r}")
    return str(value)


def check_modes(policy: object, monitor_only: object) -> tuple[Policy | None, bool | None]:
    """Validate the ``policy`` and ``monitor_only`` arguments of an integration."""
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")
    if monitor_only is not None and not isinstance(monitor_only, bool):
        raise TypeError(f"monitor_only must be a bool or None, got {monitor_only!r}")
    if monitor_only and policy is not None:
        raise ValueError(
            "policy: monitor_only=True only measures, so it takes no policy; drop one of them"
        )
    return policy, monitor_only


def _clips_at(policy: Policy, threshold: float) -> bool:
    if isinstance(policy, ClipNorm):
        return policy.max_norm == threshold
    if isinstance(policy, Chain):
        return any(_clips_at(p, threshold) for p in policy.policies)
    return False


def resolve_policy(
    policy: Policy | None,
    monitor_only: bool | None,
    framework_clip: Policy | None,
    where: str,
) -> tuple[Policy, bool]:
    """The policy the guard runs, and whether gradguard only monitors.

    ``framework_clip`` is the framework's own clip as a policy (``ClipNorm`` or
    ``ClipValue``), ``None`` when it does not clip; ``where`` names its setting in
    messages (e.g. ``"max_grad_norm=1.0"``). While monitoring, the policy describes the
    framework's clip (``ClipNorm``) or is :class:`Monitor`.
    """
    if monitor_only is None:
        monitor_only = policy is None and framework_clip is not None
    if monitor_only:
        describes = isinstance(framework_clip, ClipNorm)
        return (framework_clip if describes else Monitor()), True  # type: ignore[return-value]
    if policy is None:
        if framework_clip is None:
            return default_policy(), False
        return chain(SkipNonFinite(), framework_clip), False
    if isinstance(framework_clip, ClipNorm) and not _clips_at(policy, framework_clip.max_norm):
        _warn.warn(
            f"gradguard: the framework's own clipping ({where}) is turned off; "
            f"{type(policy).__name__} decides instead. Add ClipNorm({framework_clip.max_norm}) "
            "to the policy to keep clipping there."
        )
    return policy, False


class LossWindow:
    """The losses of the micro-batches since the last optimizer step, kept on the device.

    ``mean=True`` averages them (losses as the user computed them); ``mean=False`` sums
    them (losses a framework already divided by the number of micro-batches).
    """

    def __init__(self, mean: bool) -> None:
        self.mean = mean
        self._total: Tensor | float | None = None
        self._count = 0

    def add(self, loss: Tensor | float | None) -> None:
        if loss is None:
            return
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
            loss = loss.detach().reshape(())
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"loss must be a number or a one-element tensor, got {loss!r}")
        self._total = loss if self._total is None else self._total + loss
        self._count += 1

    def take(self) -> Tensor | float | None:
        """The window's loss (sum or mean); the window starts again."""
        total, count = self._total, self._count
        self._total, self._count = None, 0
        if total is None:
            return None
        return total / count if self.mean and count > 1 else total


def innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (LightningOptimizer, AcceleratedOptimizer)."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or a framework wrapper of one), "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def check_skippable(optimizer: Any) -> None:
    """Reject optimizers whose step cannot be made a no-op by withholding gradients."""
    inner = innermost(optimizer)
    warn_if_private(inner)
    if isinstance(inner, torch.optim.LBFGS):
        raise TypeError(
            "optimizer: LBFGS re-evaluates its closure inside step(), so gradguard cannot "
            "skip or clip its steps; use a monitor-only guard (policy=gradguard.Monitor())"
        )


class HookStep:
    """Run ``guard`` at a framework hook that comes right before ``optimizer.step()``.

    Call :meth:`run` once per optimizer step, after the gradients are final (accumulated,
    unscaled, all-reduced). The framework's own step call then does the update, or
    nothing when the guard skipped. ``defer_scale``: record the policy's clip but leave
    applying it to the framework (monitor mode, where the framework clips next).
    ``on_skipped`` runs right after a skipped step's ``optimizer.step()``.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        defer_scale: bool = False,
        on_skipped: Callable[[], None] | None = None,
    ) -> None:
        self.guard = guard
        self.defer_scale = defer_scale
        self.on_skipped = on_skipped
        self.last: StepResult | None = None
        self.skipped_last = False
        self._held: list[tuple[Tensor, Tensor]] = []
        self._hook: Any = None

    def run(
        self,
        optimizer: Any,
        *,
        loss: Tensor | float | None = None,
        step: int | None = None,
        found_inf: Tensor | None = None,
        loss_scale: Tensor | None = None,
    ) -> StepResult | None:
        """Measure, decide and clip in place; withhold the gradients if the guard skips.

        Returns ``None`` (and does nothing) when no guarded parameter has a gradient,
        e.g. when a framework runs the hook after a ``training_step`` that returned None.
        """
        self._drop_held()
        if all(p.grad is None for p in self.guard.params):
            self.last, self.skipped_last = None, False
            return None
        inner = innermost(optimizer)
        result = self.guard.process(
            loss=loss,
            lr=learning_rate(inner),
            sgd=sgd_step_gain(inner),
            step=step,
            found_inf=found_inf,
            loss_scale=loss_scale,
            defer_scale=self.defer_scale,
        )
        self.last, self.skipped_last = result, result.is_skipped()
        if self.skipped_last:
            self._withhold(inner)
        return result

    def release(self) -> None:
        """Give the withheld gradients back (also done by the step post-hook)."""
        held, self._held = self._held, []
        for param, grad in held:
            if param.grad is None:
                param.grad = grad

    def _withhold(self, inner: torch.optim.Optimizer) -> None:
        for group in inner.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._held.append((param, param.grad))
                    param.grad = None
        self._hook = inner.register_step_post_hook(lambda *_: self._after_skipped_step())

    def _after_skipped_step(self) -> None:
        self.release()
        if self.on_skipped is not None:
            self.on_skipped()

    def _drop_held(self) -> None:
        # Not called from the post-hook itself: torch iterates the hooks while calling them.
        self._held = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class CallbackBase:
    """Arguments and state shared by the framework callbacks (Lightning, Transformers)."""

    def __init__(
        self,
        policy: Policy | None,
        monitor_only: bool | None,
        lr_on_skip: str,
        norm_type: float | str,
        prefix: str,
        store: str | os.PathLike[str] | None,
        sinks: Sequence[Sink],
        log_every: int,
        health: Any,
    ) -> None:
        self.policy, self.monitor_only = check_modes(policy, monitor_only)
        self.lr_on_skip = check_lr_on_skip(lr_on_skip)
        self.prefix = str(prefix)
        self._guard_kwargs = {
            "norm_type": norm_type,
            "store": store,
            "sinks": sinks,
            "log_every": log_every,
            "health": health,
        }
        self.guard: Guard | None = None
        self._hook: HookStep | None = None
        self._monitoring = False

    @property
    def last_result(self) -> StepResult | None:
        """The last optimizer step's :class:`~gradguard.StepResult`."""
        return self._hook.last if self._hook is not None else None

    @property
    def monitoring(self) -> bool:
        """Whether gradguard only measures while the framework clips (set once training starts)."""
        return self._monitoring


def metrics(result: StepResult) -> dict[str, Tensor]:
    """A step's scalars as 0-d float tensors on the device (no host sync)."""
    return {
        "total_norm": result.total_norm.float(),
        "clipped_norm": result.clipped_norm.float(),
        "clip_coef": result.clip_coef.float(),
        "skipped": result.skipped.float(),
    }

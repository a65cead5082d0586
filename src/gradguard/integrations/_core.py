"""What every framework integration shares: run a Guard at a hook, skip without stepping.

Frameworks call ``optimizer.step()`` themselves, so an integration cannot hand the
optimizer to :meth:`Guard.step`. :class:`HookStep` calls :meth:`Guard.process` (measure,
decide, clip in place, record) at the framework's hook instead. When the guard skips,
the real step that the framework takes next must change nothing. Zeroing the gradients
would not do: Adam would still count the step and decay its moments. Instead the
gradients of every
parameter of the optimizer are set aside (``grad = None``): torch optimizers leave a
parameter without a gradient untouched (no update, no state change, no step count), and
fused and foreach kernels are handed empty lists. The gradients come back after the step
through an optimizer step post-hook, so they can still be inspected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._update import learning_rate
from ..guard import Guard, StepResult
from ..policies import Monitor, Policy
from ..schema import Sink


class CallbackBase:
    """Arguments and state shared by the framework callbacks (Lightning, Transformers)."""

    def __init__(
        self,
        policy: Policy | None,
        monitor_only: bool | None,
        norm_type: float | str,
        prefix: str,
        store: str | os.PathLike[str] | None,
        sinks: Sequence[Sink],
        log_every: int,
        health: Any,
    ) -> None:
        if monitor_only is not None and not isinstance(monitor_only, bool):
            raise TypeError(f"monitor_only must be a bool or None, got {monitor_only!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")
        self.policy = policy
        self.monitor_only = monitor_only
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

    @property
    def last_result(self) -> StepResult | None:
        """The last optimizer step's :class:`~gradguard.StepResult`."""
        return self._hook.last if self._hook is not None else None

    @property
    def monitoring(self) -> bool:
        """Whether the guard only measures (set once training starts)."""
        return bool(self.guard is not None and isinstance(self.guard.policy, Monitor))


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
    if isinstance(inner, torch.optim.LBFGS):
        raise TypeError(
            "optimizer: LBFGS re-evaluates its closure inside step(), so gradguard cannot "
            "skip or clip its steps; use a monitor-only guard (policy=gradguard.Monitor())"
        )


class HookStep:
    """Run ``guard`` at a framework hook that comes right before ``optimizer.step()``.

    Call :meth:`run` once per optimizer step, after the gradients are final (accumulated,
    unscaled, all-reduced). The framework's own step call then does the update, or
    nothing when the guard skipped.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.last: StepResult | None = None
        self.skipped_last = False
        self._held: list[tuple[Tensor, Tensor]] = []
        self._hook: Any = None

    def run(self, optimizer: Any, *, loss: Tensor | float | None = None) -> StepResult | None:
        """Measure, decide and clip in place; withhold the gradients if the guard skips.

        Returns ``None`` (and does nothing) when no guarded parameter has a gradient,
        e.g. when a framework runs the hook after a ``training_step`` that returned None.
        """
        self._drop_held()
        if all(p.grad is None for p in self.guard.params):
            self.last, self.skipped_last = None, False
            return None
        result = self.guard.process(loss=loss, lr=learning_rate(innermost(optimizer)))
        self.last, self.skipped_last = result, result.is_skipped()
        if self.skipped_last:
            self._withhold(optimizer)
        return result

    def release(self) -> None:
        """Give the withheld gradients back (also done by the step post-hook)."""
        held, self._held = self._held, []
        for param, grad in held:
            if param.grad is None:
                param.grad = grad

    def _withhold(self, optimizer: Any) -> None:
        inner = innermost(optimizer)
        for group in inner.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._held.append((param, param.grad))
                    param.grad = None
        self._hook = inner.register_step_post_hook(lambda *_: self.release())

    def _drop_held(self) -> None:
        # Not called from the post-hook itself: torch iterates the hooks while calling them.
        self._held = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def metrics(result: StepResult) -> dict[str, Tensor]:
    """A step's scalars as 0-d float tensors on the device (no host sync)."""
    return {
        "total_norm": result.total_norm.float(),
        "clipped_norm": result.clipped_norm.float(),
        "clip_coef": result.clip_coef.float(),
        "skipped": result.skipped.float(),
    }

"""Accelerate: guard the gradients of a hand-written ``accelerate`` loop.

``guard_gradients`` takes the place of ``accelerator.clip_grad_norm_``: call it on every
micro-batch between ``accelerator.backward`` and ``optimizer.step()``. While gradients
only accumulate it keeps the loss and returns ``None``; at the synchronising micro-batch
it unscales fp16 gradients (as ``clip_grad_norm_`` does), measures, clips and decides on
the all-reduced (DDP) or sharded (FSDP2) gradients, so every process takes the same
decision. A skipped step is carried out by the ``optimizer.step()`` that follows, which
then changes no parameter and no optimizer state, and ``accelerator.optimizer_step_was_
skipped`` is True afterwards, as on an fp16 overflow, so a prepared scheduler holds the
learning rate (``lr_on_skip="hold"``, the default; ``"advance"`` leaves the flag unset and
the scheduler steps)::

    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(batch).loss
            accelerator.backward(loss)
            result = guard_gradients(accelerator, guard, optimizer, loss=loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

To keep clipping where ``accelerator.clip_grad_norm_(params, 1.0)`` clipped, build the
guard with ``ClipNorm(1.0)`` (after ``SkipNonFinite()``). DeepSpeed, FSDP1, Megatron-LM
and XLA keep or shard the gradients themselves and are refused; for DeepSpeed use
:mod:`gradguard.integrations.deepspeed`.
"""

from __future__ import annotations

import weakref
from typing import Any

try:
    from accelerate.utils import DistributedType
except ImportError as error:
    raise ImportError(
        "gradguard.integrations.accelerate needs accelerate: pip install 'gradguard[accelerate]'"
    ) from error

from torch import Tensor

from .. import _amp
from ..guard import Guard, StepResult
from ._core import HookStep, LossWindow, check_lr_on_skip, check_skippable, innermost

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "use gradguard.integrations.deepspeed.DeepSpeedGuard",
    DistributedType.MEGATRON_LM: "Megatron-LM keeps its own gradient buffers",
    DistributedType.XLA: "XLA reduces gradients inside optimizer.step",
}


class SkipSignal:
    """Accelerate's own flag for a skipped step, set for a step that gradguard skipped.

    ``AcceleratedOptimizer.step_was_skipped`` (read by ``accelerator.
    optimizer_step_was_skipped``, the Trainer and prepared schedulers) is computed inside
    its ``step()``: with a ``GradScaler`` from whether the inner step ran, otherwise it is
    never set. :meth:`set` runs from the inner optimizer's step post-hook, so it tells
    that computation the step was skipped (or sets the flag where nothing computes it).
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer if hasattr(optimizer, "_is_overflow") else None
        self._set = False

    def set(self) -> None:
        optimizer = self.optimizer
        if optimizer is None:
            return
        if getattr(optimizer, "scaler", None) is not None:
            optimizer._accelerate_step_called = False  # read right after the inner step
        else:
            optimizer._is_overflow = True
        self._set = True

    def clear(self) -> None:
        """Before the next step: the flag set for a skip goes back to False."""
        if self._set and self.optimizer is not None:
            self.optimizer._is_overflow = False
        self._set = False


class _Loop:
    """What ``guard_gradients`` keeps between calls for one guard."""

    def __init__(self, guard: Guard, optimizer: Any, lr_on_skip: str) -> None:
        check_skippable(optimizer)
        self.signal = SkipSignal(optimizer)
        on_skipped = self.signal.set if lr_on_skip == "hold" else None
        self.hook = HookStep(guard, on_skipped=on_skipped)
        self.losses = LossWindow(mean=True)
        self.lr_on_skip = lr_on_skip


_loops: weakref.WeakKeyDictionary[Guard, _Loop] = weakref.WeakKeyDictionary()


def guard_gradients(
    accelerator: Any,
    guard: Guard,
    optimizer: Any,
    *,
    loss: Tensor | float | None = None,
    step: int | None = None,
    lr_on_skip: str = "hold",
) -> StepResult | None:
    """Measure, clip and (maybe) skip this step's gradients; ``None`` while accumulating.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        guard: a :class:`~gradguard.Guard` over the (prepared) model.
        optimizer: the prepared optimizer whose ``step()`` comes next.
        loss: this micro-batch's loss; the mean over the step's micro-batches is recorded.
        step: your number for this optimizer step (default: the guard counts from 0).
        lr_on_skip: ``"hold"`` sets ``accelerator.optimizer_step_was_skipped`` on a skipped
            step, so a prepared scheduler holds the learning rate; ``"advance"`` does not.
    """
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must be a gradguard Guard, got {type(guard).__name__}")
    if not hasattr(accelerator, "sync_gradients"):
        raise TypeError(
            f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
        )
    check_lr_on_skip(lr_on_skip)
    kind = accelerator.distributed_type
    why = _UNSUPPORTED.get(kind)
    if why is None and kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        why = "FSDP1 flattens the parameters; use FSDP2 (fsdp_version=2)"
    if why is not None:
        raise NotImplementedError(f"guard_gradients does not support {kind}: {why}")
    loop = _loops.get(guard)
    if loop is None or loop.lr_on_skip != lr_on_skip:
        loop = _loops[guard] = _Loop(guard, optimizer, lr_on_skip)
    loop.losses.add(loss)
    if not accelerator.sync_gradients:
        return None
    loop.signal.clear()
    inner = innermost(optimizer)
    found_inf = loss_scale = None
    scaler = getattr(accelerator, "scaler", None)
    grads = [p.grad for p in guard.params if p.grad is not None]
    if grads and scaler is not None and scaler.is_enabled():
        _amp.unscale_once(scaler, inner)
        found_inf = _amp.found_inf(scaler, inner, grads[0].device)
        loss_scale = _amp.current_scale(scaler)
    return loop.hook.run(
        optimizer, loss=loop.losses.take(), step=step, found_inf=found_inf, loss_scale=loss_scale
    )

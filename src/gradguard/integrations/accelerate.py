"""Accelerate: guard the gradients of a hand-written ``accelerate`` loop.

``guard_gradients`` takes the place of ``accelerator.clip_grad_norm_`` inside
``if accelerator.sync_gradients:`` (or anywhere between ``accelerator.backward`` and
``optimizer.step()``: on micro-batches that only accumulate it does nothing). Like
``clip_grad_norm_`` it unscales fp16 gradients first and acts on the gradients after
the all-reduce, so every process takes the same decision. A skipped step is carried out
by the ``optimizer.step()`` that follows, which then changes no parameter and no
optimizer state; the learning rate scheduler is yours to hold::

    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(batch).loss)
            result = guard_gradients(accelerator, guard, optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

DeepSpeed, FSDP, Megatron-LM and XLA keep or shard the gradients themselves and are
refused; for DeepSpeed use :mod:`gradguard.integrations.deepspeed`.
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
from ._core import HookStep, check_skippable, innermost

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "use gradguard.integrations.deepspeed.DeepSpeedMonitor",
    DistributedType.FSDP: "FSDP shards the gradients; measure with the sharded module",
    DistributedType.MEGATRON_LM: "Megatron-LM keeps its own gradient buffers",
    DistributedType.XLA: "XLA reduces gradients inside optimizer.step",
}
_hooks: weakref.WeakKeyDictionary[Guard, HookStep] = weakref.WeakKeyDictionary()


def guard_gradients(
    accelerator: Any,
    guard: Guard,
    optimizer: Any,
    *,
    loss: Tensor | float | None = None,
) -> StepResult | None:
    """Measure, clip and (maybe) skip this step's gradients; ``None`` while accumulating.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        guard: a :class:`~gradguard.Guard` over the (prepared) model.
        optimizer: the prepared optimizer whose ``step()`` comes next.
        loss: recorded with the step when given.
    """
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must be a gradguard Guard, got {type(guard).__name__}")
    if not hasattr(accelerator, "sync_gradients"):
        raise TypeError(
            f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}"
        )
    why = _UNSUPPORTED.get(accelerator.distributed_type)
    if why is not None:
        raise NotImplementedError(
            f"guard_gradients does not support {accelerator.distributed_type}: {why}"
        )
    if not accelerator.sync_gradients:
        return None
    hook = _hooks.get(guard)
    if hook is None:
        check_skippable(optimizer)
        hook = _hooks[guard] = HookStep(guard)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        _amp.unscale_once(scaler, innermost(optimizer))
    return hook.run(optimizer, loss=loss)

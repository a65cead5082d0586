"""DeepSpeed: record the gradients of an engine; DeepSpeed keeps clipping and stepping.

DeepSpeed owns the gradients (partitioned under ZeRO, flattened, loss-scaled in fp16) and
clips inside ``engine.step()`` from its config's ``gradient_clipping``. So gradguard only
monitors here: :meth:`DeepSpeedMonitor.step` replaces ``engine.step()``; at an
accumulation boundary it assembles each parameter's full gradient with DeepSpeed's
``safe_get_full_grad`` (a collective under ZeRO-3: every rank must call it, in the same
order), measures per-tensor and global norms, lets the engine step, then records the
step: the pre-clip norm, DeepSpeed's clip coefficient from ``gradient_clipping`` and
whether the engine applied the step (``was_step_applied``: False on an fp16 overflow).

Limits: no clipping or skipping by gradguard policies (use DeepSpeed's config); with
fp16 loss scaling the gradients are divided by the engine's current loss scale before
measuring (read from ``engine.optimizer.loss_scale``); assembling full gradients costs
memory and, under ZeRO-3, communication, so measure every ``measure_every`` steps on
large models.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

try:
    from deepspeed.utils import safe_get_full_grad
except ImportError as error:
    raise ImportError(
        "gradguard.integrations.deepspeed needs DeepSpeed: pip install 'gradguard[deepspeed]'"
    ) from error

import torch

from .. import _validate as check
from ..schema import Sink, SkipReason
from ..stats import GradStats, measure_grads


class DeepSpeedMonitor:
    """Measure and record a DeepSpeed engine's gradients at each optimizer step.

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize``.
        norm_type: the p-norm measured.
        measure_every: measure every n-th optimizer step (others are only stepped).
        store, sinks, log_every: recording, as for :class:`~gradguard.Guard`; records
            only on rank 0 unless a ``recorder`` is given.
        recorder: a ready :class:`~gradguard.record.Recorder` instead.
    """

    def __init__(
        self,
        engine: Any,
        *,
        norm_type: float | str = 2.0,
        measure_every: int = 1,
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        recorder: Any = None,
    ) -> None:
        for attribute in ("step", "module", "is_gradient_accumulation_boundary"):
            if not hasattr(engine, attribute):
                raise TypeError(
                    f"engine must be a DeepSpeedEngine (from deepspeed.initialize), "
                    f"got {type(engine).__name__}"
                )
        self.engine = engine
        self.norm_type = check.norm_type(norm_type)
        if not isinstance(measure_every, int) or measure_every < 1:
            raise ValueError(f"measure_every must be a positive int, got {measure_every!r}")
        self.measure_every = measure_every
        pairs = list(engine.module.named_parameters())
        self.params = [p for _, p in pairs if p.requires_grad]
        self.names = [n for n, p in pairs if p.requires_grad]
        if recorder is None and (store is not None or sinks):
            from ..record import Recorder

            is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            if is_main:
                recorder = Recorder(store if store is not None else False, sinks, log_every)
        self.recorder = recorder
        self._steps = 0
        self._started = False
        self.last_stats: GradStats | None = None

    def measure(self) -> GradStats:
        """Full gradients of every trainable parameter, measured (call on every rank)."""
        grads, names = [], []
        for name, param in zip(self.names, self.params):
            grad = safe_get_full_grad(param)
            if grad is not None:
                grads.append(grad)
                names.append(name)
        if not grads:
            raise ValueError(
                "DeepSpeedMonitor found no gradients: call engine.backward(loss) before step()"
            )
        scale = _loss_scale(self.engine)
        if scale is not None:
            grads = [g / scale for g in grads]
        return measure_grads(grads, self.norm_type, names=names, dtype=torch.float32)

    def step(self, *, loss: torch.Tensor | float | None = None) -> GradStats | None:
        """Use in place of ``engine.step()``. Returns the measured stats at measured steps."""
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        measure = boundary and self._steps % self.measure_every == 0
        stats = self.measure() if measure else None
        self.engine.step()
        if not boundary:
            return None
        step, self._steps = self._steps, self._steps + 1
        if stats is None:
            return None
        self.last_stats = stats
        self._record(step, stats, loss)
        return stats

    def _record(self, step: int, stats: GradStats, loss: Any) -> None:
        if self.recorder is None:
            return
        if not self._started:
            self.recorder.start(
                stats.labels(),
                [tuple(s) for s in stats.shapes],
                {"integration": "deepspeed", "norm_type": self.norm_type},
            )
            self._started = True
        total = stats.total_norm.float()
        clip = float(self.engine.gradient_clipping() or 0.0)
        if clip > 0:
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            threshold = torch.full_like(total, clip)
        else:
            coef, threshold = torch.ones_like(total), torch.full_like(total, math.inf)
        applied = getattr(self.engine, "was_step_applied", None)
        skipped = applied is not None and not applied()
        reason = SkipReason.AMP_OVERFLOW if skipped else SkipReason.NONE
        optimizer = getattr(self.engine, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) or [{}]
        lr = groups[0].get("lr")
        self.recorder.record(
            step,
            total_norm=total,
            clipped_norm=total * coef,
            clip_coef=coef,
            threshold=threshold,
            skipped=torch.tensor(skipped, device=total.device),
            reason=torch.tensor(int(reason), dtype=torch.int8, device=total.device),
            loss=loss.detach() if isinstance(loss, torch.Tensor) else loss,
            lr=float(lr) if isinstance(lr, (int, float)) else None,
            stats=stats,  # kept for snapshot steps and non-finite steps
        )

    def close(self) -> None:
        """Flush and close the recorder, if any."""
        if self.recorder is not None:
            self.recorder.close()


def _loss_scale(engine: Any) -> float | None:
    """The fp16 loss scale the gradients still carry, or None without fp16."""
    fp16 = getattr(engine, "fp16_enabled", None)
    if fp16 is None or not fp16():
        return None
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) and scale > 0 else None

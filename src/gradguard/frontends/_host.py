"""Recording from host numbers: the entry point that front-ends share.

Front-ends that cannot (or need not) hand device tensors to the
:class:`~gradguard.record.Recorder` collect a log interval of steps on their device,
copy it to the host in one transfer, and feed the rows here as Python numbers.
The rows reach the same run store, sinks and health rules as a PyTorch run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..record import Event, HostBatch, Recorder, RunStore, Sink
from ..stats import GradStats

_INF = math.inf


class HostRecorder:
    """Record training steps given as host numbers to a run store, sinks and health rules.

    Args:
        store: run directory, ``.db`` path or :class:`RunStore`; ``None`` for
            ``runs/<timestamp>``; ``False`` for sinks only.
        sinks: further sinks (TensorBoard, W&B, MLflow, console).
        log_every: steps per flush to the store and sinks.
        tensor_every: per-tensor snapshot interval; defaults to ``log_every``.
        health: run the health rules at each flush and record their findings as events
            (``True``), with a given :class:`~gradguard.health.HealthConfig`, or not (``False``).
        config: run configuration stored in the run's meta (e.g. ``{"framework": "jax"}``).
        recorder: a ready :class:`Recorder` instead of ``store``/``sinks``/``log_every``.
    """

    def __init__(
        self,
        store: RunStore | str | os.PathLike[str] | bool | None = None,
        *,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        tensor_every: int | None = None,
        health: Any = True,
        config: dict | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.recorder = recorder or Recorder(
            store, sinks, log_every, tensor_every, rank=0, config=config
        )
        if recorder is not None and config:
            self.recorder.config.update(config)
        self.health: Any = None
        if health is not False:
            self._attach_health(health)
        self._names: tuple[str, ...] | None = None

    @property
    def log_every(self) -> int:
        return self.recorder.log_every

    def start(self, names: Sequence[str], shapes: Sequence[Sequence[int]] | None = None) -> None:
        """Declare tensor names (and shapes) once, before the first :meth:`record`."""
        if self._names is None:
            self._names = tuple(names)
            self.recorder.start(self._names, shapes)

    def wants_tensor_norms(self, step: int) -> bool:
        """Whether :meth:`record` keeps per-tensor norms at ``step``."""
        return self.recorder.wants_tensor_norms(step)

    def record(
        self,
        step: int,
        *,
        total_norm: float,
        clip_coef: float = 1.0,
        clipped_norm: float | None = None,
        threshold: float = _INF,
        skipped: bool | float = False,
        reason: int = 0,
        loss: float | None = None,
        lr: float | None = None,
        loss_scale: float | None = None,
        tensor_norms: Sequence[float] | None = None,
        clipped: bool | float | None = None,
    ) -> HostBatch | None:
        """Record one step from Python numbers; returns the batch when this call flushed.

        ``clipped_norm`` defaults to ``total_norm * clip_coef``. ``tensor_norms`` (in the
        order given to :meth:`start`) is stored at snapshot steps and non-finite steps.
        """
        stats = None
        wanted = self.recorder.wants_tensor_norms(step) or not math.isfinite(total_norm)
        if tensor_norms is not None and wanted:
            stats = _host_stats(tensor_norms, total_norm, self._names)
        if clipped_norm is None:
            clipped_norm = total_norm * clip_coef
        return self.recorder.record(
            step,
            total_norm=float(total_norm),
            clipped_norm=float(clipped_norm),
            clip_coef=float(clip_coef),
            threshold=float(threshold),
            skipped=float(skipped),
            reason=int(reason),
            loss=None if loss is None else float(loss),
            lr=None if lr is None else float(lr),
            loss_scale=None if loss_scale is None else float(loss_scale),
            stats=stats,
            clipped=None if clipped is None else float(clipped),
        )

    def event(self, event: Event) -> None:
        """Record an event (written with the next flush)."""
        self.recorder.event(event)

    def flush(self) -> HostBatch | None:
        return self.recorder.flush()

    def close(self) -> None:
        """Flush and close the store and sinks."""
        self.recorder.close()

    def __enter__(self) -> HostRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attach_health(self, health: Any) -> None:
        from ..health import HealthConfig
        from ..health.listener import attach_health

        config = health if isinstance(health, HealthConfig) else HealthConfig()
        self.health = attach_health(self.recorder, config)


def _host_stats(norms: Sequence[float], total: float, names: tuple[str, ...] | None) -> GradStats:
    """A CPU :class:`GradStats` around host norms, for the Recorder's snapshot path."""
    values = torch.tensor([float(v) for v in norms], dtype=torch.float32)
    n = values.numel()
    return GradStats(
        norms=values,
        total_norm=torch.tensor(float(total), dtype=torch.float32),
        norm_type=2.0,
        names=names if names is not None and len(names) == n else None,
        shapes=tuple(torch.Size([]) for _ in range(n)),
    )

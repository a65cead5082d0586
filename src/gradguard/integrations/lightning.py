"""Lightning: ``GradGuardCallback`` guards every optimizer step of a ``Trainer``.

It acts in ``on_before_optimizer_step``, which Lightning calls once per optimizer step
after the last accumulated micro-batch, after AMP's unscale and before its own gradient
clipping, so the guard sees the gradients the optimizer will use. Metrics go through
``pl_module.log`` (so to every logger of the Trainer) as device tensors. A skipped step
still counts as a Trainer step (``global_step`` advances, as on an AMP overflow) but
leaves parameters and optimizer state untouched.

    trainer = L.Trainer(callbacks=[GradGuardCallback()])  # instead of gradient_clip_val
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone "pytorch_lightning" package
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            "gradguard.integrations.lightning needs Lightning: pip install 'gradguard[lightning]'"
        ) from error

from ..guard import Guard
from ..policies import Monitor, Policy
from ..schema import Sink
from ._core import CallbackBase, HookStep, check_skippable, metrics


def refuse_sharded(strategy: Any) -> None:
    """DeepSpeed and FSDP keep or shard the gradients: the callback would see the wrong ones."""
    name = type(strategy).__name__
    if "DeepSpeed" in name or "FSDP" in name:
        raise NotImplementedError(
            f"GradGuardCallback does not support {name}: the gradients are sharded or owned "
            "by the engine. For DeepSpeed use gradguard.integrations.deepspeed.DeepSpeedMonitor."
        )


class GradGuardCallback(CallbackBase, Callback):
    """Guard a LightningModule's gradients at every optimizer step.

    Args:
        policy: the guard's policy (default :func:`~gradguard.default_policy`).
        monitor_only: only measure and record. ``None`` (default) decides from the
            Trainer: monitor when ``gradient_clip_val`` is set (Lightning clips), guard
            otherwise.
        norm_type: the p-norm measured and clipped.
        prefix: prefix of the metric names given to ``pl_module.log``.
        log: send metrics through ``pl_module.log`` each step.
        store, sinks, log_every, health: recording, as for :class:`~gradguard.Guard`.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        monitor_only: bool | None = None,
        norm_type: float | str = 2.0,
        prefix: str = "gradguard/",
        log: bool = True,
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        health: Any = True,
    ) -> None:
        CallbackBase.__init__(
            self, policy, monitor_only, norm_type, prefix, store, sinks, log_every, health
        )
        self.log = log
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.guard is not None:
            return
        clip_val = trainer.gradient_clip_val
        lightning_clips = clip_val is not None and float(clip_val) > 0
        monitor = self.monitor_only
        if monitor is None:
            monitor = lightning_clips
            if lightning_clips:
                warnings.warn(
                    f"gradguard: the Trainer clips gradients (gradient_clip_val={clip_val}), so "
                    "GradGuardCallback only measures. Unset gradient_clip_val to let gradguard "
                    "clip and skip.",
                    UserWarning,
                    stacklevel=2,
                )
        elif not monitor and lightning_clips:
            warnings.warn(
                f"gradguard: both gradguard and the Trainer (gradient_clip_val={clip_val}) clip; "
                "gradguard acts first, then Lightning clips the result again.",
                UserWarning,
                stacklevel=2,
            )
        policy = Monitor() if monitor else self.policy
        self.guard = Guard(pl_module, policy, **self._guard_kwargs)
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None
        self._hook = HookStep(self.guard)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is None:  # fit without setup (a Trainer subclass that skips it)
            self.setup(trainer, pl_module, "fit")
        refuse_sharded(trainer.strategy)
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            raise ValueError(
                f"GradGuardCallback guards one optimizer; this Trainer has {len(optimizers)}. "
                "Use gradguard.Guard on each optimizer's parameters in manual optimization."
            )
        if not self.monitoring:
            for optimizer in optimizers:
                check_skippable(optimizer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        assert self._hook is not None
        result = self._hook.run(optimizer)
        if result is None or not self.log:
            return
        values = {self.prefix + k: v for k, v in metrics(result).items()}
        try:
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        except Exception as error:  # a logging fault never stops training
            warnings.warn(f"gradguard: logging failed: {error}", RuntimeWarning, stacklevel=2)
            self.log = False

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is not None:
            self.guard.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.guard is not None:
            self.guard.close()

    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict() if self.guard is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.guard is None:
            self._pending_state = dict(state_dict)
        else:
            self.guard.load_state_dict(state_dict)

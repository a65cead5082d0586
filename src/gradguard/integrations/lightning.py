"""Lightning: ``GradGuardCallback`` guards every optimizer step of a ``Trainer``.

It acts in ``on_before_optimizer_step``, which Lightning calls once per optimizer step
after the last accumulated micro-batch, after AMP's unscale and before its own gradient
clipping, so the guard sees the pre-clip gradients the optimizer will use. Each optimizer
gets its own guard (several optimizers in manual optimization, e.g. a GAN's); metrics go
through ``pl_module.log`` (so to every logger of the Trainer) as device tensors.

- **monitor** (the default while ``gradient_clip_val`` is set and no policy is given):
  Lightning keeps clipping; gradguard records the pre-clip norm with Lightning's
  threshold and coefficient (clipping by norm; by value only the norm is recorded).
- **guard** (otherwise): gradguard's policy clips and skips and Lightning's clip is
  turned off for the fit; without a policy of yours, ``gradient_clip_val`` becomes
  ``chain(SkipNonFinite(), ClipNorm(val))`` (``ClipValue`` when clipping by value).

A skipped step counts in ``trainer.global_step`` (as an fp16 overflow does) but leaves
parameters and optimizer state untouched; the user's own ``on_before_optimizer_step``
then sees ``grad=None``. With ``lr_on_skip="hold"`` (default) Lightning does not step the
optimizer's step-interval schedulers after a skipped step (in manual optimization the
schedulers are yours: check ``callback.result_for(optimizer).is_skipped()``). Recorded step
numbers are ``trainer.global_step`` at the step, the step Lightning's loggers use.

    trainer = L.Trainer(callbacks=[GradGuardCallback()])  # instead of gradient_clip_val
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
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

from .. import _amp, _warn
from ..guard import Guard, StepResult
from ..policies import ClipNorm, ClipValue, Monitor, Policy
from ..schema import Sink
from ._core import (
    CallbackBase,
    HookStep,
    LossWindow,
    check_skippable,
    innermost,
    metrics,
    resolve_policy,
)

_HELD = "gradguard: held"  # a scheduler interval Lightning matches with no step


def refuse_sharded(strategy: Any) -> None:
    """Refuse DeepSpeed (the engine owns the gradients) and FSDP1 (it flattens them)."""
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise NotImplementedError(
            f"GradGuardCallback does not support {name}: the engine owns the gradients; "
            "use gradguard.integrations.deepspeed.DeepSpeedGuard in a DeepSpeed loop"
        )
    if "FSDP" in name:
        raise NotImplementedError(
            f"GradGuardCallback does not support {name}: FSDP1 flattens the parameters, so "
            "per-tensor norms are not defined on a rank; use ModelParallelStrategy "
            "(FSDP2, fully_shard in configure_model), whose DTensor gradients gradguard "
            "measures exactly"
        )


class GradGuardCallback(CallbackBase, Callback):
    """Guard a LightningModule's gradients at every optimizer step.

    Args:
        policy: gradguard's policy (copied for each optimizer); given, gradguard clips
            and skips in place of ``gradient_clip_val``.
        monitor_only: only record. ``None`` (default): monitor while the Trainer clips
            (``gradient_clip_val`` set) and no policy is given, guard otherwise.
        lr_on_skip: ``"hold"`` (default): a skipped step does not move the optimizer's
            step-interval schedulers; ``"advance"``: Lightning steps them as usual.
        norm_type: the p-norm measured and clipped.
        prefix: prefix of the metric names given to ``pl_module.log``.
        log: send metrics through ``pl_module.log`` each step.
        store, sinks, log_every, health: recording, as for :class:`~gradguard.Guard`
            (rank 0 records). With several optimizers each records its own run, in
            ``<store>/optimizer<i>``, and ``sinks`` are refused (log through Lightning).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        monitor_only: bool | None = None,
        lr_on_skip: str = "hold",
        norm_type: float | str = 2.0,
        prefix: str = "gradguard/",
        log: bool = True,
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        health: Any = True,
    ) -> None:
        CallbackBase.__init__(
            self,
            policy,
            monitor_only,
            lr_on_skip,
            norm_type,
            prefix,
            store,
            sinks,
            log_every,
            health,
        )
        self.log = log
        self.guards: list[Guard] = []
        self._steps: dict[int, tuple[int, HookStep]] = {}  # id(optimizer) -> index, hook
        self._policy: Policy | None = None
        self._defer = False
        self._losses = LossWindow(mean=False)  # Lightning divides by the micro-batches
        self._pending_state: dict[str, Any] | None = None
        self._restore_clip: tuple[Any, Any] | None = None
        self._held: list[Any] = []
        self._last: StepResult | None = None

    # -- set-up ----------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._policy is not None:
            return
        self.guards, self._steps = [], {}  # closed at the end of an earlier fit
        clip, where, custom = _lightning_clip(trainer, pl_module)
        policy, self._monitoring = resolve_policy(self.policy, self.monitor_only, clip, where)
        # A module that clips its own way is recorded, not described.
        self._policy = Monitor() if self._monitoring and custom else policy
        # While monitoring, Lightning applies its clip after this callback: record it only.
        self._defer = self._monitoring
        if not self._monitoring and clip is not None:
            self._restore_clip = (trainer, trainer.gradient_clip_val)
            trainer.gradient_clip_val = None  # gradguard's policy clips instead

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._policy is None:  # fit without setup (a Trainer subclass that skips it)
            self.setup(trainer, pl_module, "fit")
        refuse_sharded(trainer.strategy)
        if self.guards:
            return
        optimizers = [innermost(o) for o in trainer.optimizers]
        if not self._monitoring:
            for optimizer in optimizers:
                check_skippable(optimizer)
        self._build(pl_module, optimizers)

    def _build(self, pl_module: Any, optimizers: list[Any]) -> None:
        assert self._policy is not None
        several = len(optimizers) > 1
        kwargs = dict(self._guard_kwargs)
        if several and kwargs["sinks"]:
            raise ValueError(
                "sinks: with several optimizers each records its own run; log through "
                "Lightning's loggers (log=True) instead of gradguard sinks"
            )
        names = {id(p): n for n, p in pl_module.named_parameters()}
        states = (self._pending_state or {}).get("guards") or []
        for index, optimizer in enumerate(optimizers):
            if several:
                params: Any = [
                    (names.get(id(p), f"optimizer{index}.param{j}"), p)
                    for j, p in enumerate(q for g in optimizer.param_groups for q in g["params"])
                ]
                kwargs["store"] = _store_of(self._guard_kwargs["store"], index)
            else:
                params = pl_module
            policy = copy.deepcopy(self._policy) if several else self._policy
            guard = Guard(params, policy, **kwargs)
            if index < len(states):
                guard.load_state_dict(states[index])
            self.guards.append(guard)
            self._steps[id(optimizer)] = (index, HookStep(guard, defer_scale=self._defer))
        self.guard = self.guards[0]
        self._hook = self._steps[id(optimizers[0])][1]
        self._pending_state = None

    # -- each step -------------------------------------------------------------------

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._losses.add(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        inner = innermost(optimizer)
        entry = self._steps.get(id(inner))
        if entry is None:
            return  # an optimizer Lightning did not know at fit start
        index, hook = entry
        found_inf = loss_scale = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            grads = [p.grad for p in hook.guard.params if p.grad is not None]
            if grads:  # Lightning unscaled them before this hook
                found_inf = _amp.found_inf(scaler, inner, grads[0].device)
                loss_scale = _amp.current_scale(scaler)
        result = hook.run(
            inner,
            loss=self._losses.take(),
            step=trainer.global_step,
            found_inf=found_inf,
            loss_scale=loss_scale,
        )
        if result is None:
            return
        self._last = result
        if hook.skipped_last and self.lr_on_skip == "hold":
            self._hold_schedulers(trainer, inner)
        if self.log:
            self._log(pl_module, result, index if len(self._steps) > 1 else None)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._release_schedulers()

    def _hold_schedulers(self, trainer: Any, optimizer: Any) -> None:
        """Lightning steps schedulers right after the optimizer, in the same batch: give the
        optimizer's step-interval ones an interval no call matches until the batch ends."""
        if not trainer.lightning_module.automatic_optimization:
            return
        for config in trainer.lr_scheduler_configs:
            if (
                config.interval == "step"
                and not config.reduce_on_plateau
                and getattr(config.scheduler, "optimizer", None) is optimizer
            ):
                config.interval = _HELD
                self._held.append(config)

    def _release_schedulers(self) -> None:
        for config in self._held:
            config.interval = "step"
        self._held = []

    def _log(self, pl_module: Any, result: StepResult, index: int | None) -> None:
        prefix = self.prefix if index is None else f"{self.prefix}optimizer{index}/"
        values = {prefix + k: v for k, v in metrics(result).items()}
        try:
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        except Exception as error:  # a logging fault never stops training
            _warn.warn(f"gradguard: logging failed: {error}")
            self.log = False

    # -- results and the end of the fit ---------------------------------------------------

    @property
    def last_result(self) -> StepResult | None:
        """The last optimizer step's :class:`~gradguard.StepResult` (any optimizer)."""
        return self._last

    def result_for(self, optimizer: Any) -> StepResult | None:
        """The last :class:`~gradguard.StepResult` of ``optimizer`` (or its wrapper)."""
        entry = self._steps.get(id(innermost(optimizer)))
        return entry[1].last if entry is not None else None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish()

    def _finish(self) -> None:
        self._release_schedulers()
        if self._restore_clip is not None:
            trainer, value = self._restore_clip
            trainer.gradient_clip_val = value
            self._restore_clip = None
        for guard in self.guards:
            guard.close()
        self._policy = None  # a next fit decides (and builds its guards) again

    def state_dict(self) -> dict[str, Any]:
        if not self.guards:
            return {}
        return {"guards": [guard.state_dict() for guard in self.guards]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "guards" not in state_dict:  # saved by gradguard before several optimizers
            state_dict = {"guards": [state_dict]}
        if not self.guards:
            self._pending_state = dict(state_dict)
            return
        for guard, state in zip(self.guards, state_dict["guards"]):
            guard.load_state_dict(state)


def _lightning_clip(trainer: Any, pl_module: Any) -> tuple[Policy | None, str, bool]:
    """Lightning's own clip as a policy (``None`` when it does not clip), its setting, and
    whether the module clips its own way (an overridden ``configure_gradient_clipping``)."""
    value = trainer.gradient_clip_val
    if value is None or float(value) <= 0:
        return None, "", False
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", None) or "norm")
    where = f"gradient_clip_val={value}, gradient_clip_algorithm={algorithm!r}"
    owner = next(c for c in type(pl_module).__mro__ if "configure_gradient_clipping" in vars(c))
    custom = owner.__module__.split(".", 1)[0] not in ("lightning", "pytorch_lightning")
    clip = ClipValue(float(value)) if algorithm == "value" else ClipNorm(float(value))
    return clip, where, custom


def _store_of(store: Any, index: int) -> Any:
    """The run store of optimizer ``index`` when several optimizers record."""
    if store is None:
        return None
    path = Path(store)
    if path.suffix == ".db":
        return path.with_name(f"{path.stem}-optimizer{index}{path.suffix}")
    return path / f"optimizer{index}"

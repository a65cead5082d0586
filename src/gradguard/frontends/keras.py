"""Keras 3 front-end: a ``model.fit`` callback that records gradient health, and the
mapping between Keras's clipping arguments and gradguard policies.

Keras's clipping arguments are gradguard's fixed policies: ``clipnorm=c`` clips each
gradient tensor on its own (:class:`~gradguard.ClipTensorNorm`), ``global_clipnorm=c``
clips all of them together (:class:`~gradguard.ClipNorm`), ``clipvalue=v`` clamps every
element (:class:`~gradguard.ClipValue`). Keras's coefficient is ``c / max(‖g‖, c)``;
gradguard's (torch's) adds ``1e-6`` to the norm, a relative difference below 1e-6.

:class:`GradientRecorder` works on the TensorFlow, JAX and PyTorch backends. It wraps
the optimizer's gradient-clipping step, so it sees the real gradients (accumulated,
unscaled, right before the update). Inside the compiled train step it writes one row per
optimizer step (step, norm before and after clipping, learning rate, loss scale, skip
flag, per-variable norms) into a small ring buffer held as two extra *optimizer
variables*: on the JAX backend, where Keras runs the step statelessly, that is the state
Keras threads through the step, so the rows survive it. The callback reads the buffer
once every ``log_every`` batches (one device→host transfer) and records the rows to the
same run store a PyTorch run writes. The extra variables are left out of saved
checkpoints and removed at the end of ``fit``.

With a :class:`keras.optimizers.LossScaleOptimizer` (mixed precision), a step whose
scaled gradients hold inf/NaN is skipped by Keras; the callback records it as skipped
(``SkipReason.AMP_OVERFLOW``, with the loss scale and the non-finite variables) and
emits a skip event. Without one, Keras applies non-finite gradients: the step is
recorded with its non-finite norms, and the health rules report it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from .. import _warn
from ..policies import ClipNorm, ClipTensorNorm, ClipValue, Policy
from ..record import RunStore, Sink
from ..schema import SkipReason, skip_event
from . import _keras_log as layout
from ._host import HostRecorder
from ._keras_log import StepLog, index_of, squares

_ABSENT = object()


# ------------------------------------------------------------------- clipping arguments
def policy_from_keras(
    clipnorm: float | None = None,
    global_clipnorm: float | None = None,
    clipvalue: float | None = None,
) -> Policy | None:
    """The gradguard policy equivalent to Keras optimizer clipping arguments (or ``None``)."""
    given = {
        k: v
        for k, v in (
            ("clipnorm", clipnorm),
            ("global_clipnorm", global_clipnorm),
            ("clipvalue", clipvalue),
        )
        if v is not None
    }
    if len(given) > 1:
        raise ValueError(
            f"only one of clipnorm, global_clipnorm and clipvalue can be set, got {given}"
        )
    if clipnorm is not None:
        return ClipTensorNorm(clipnorm)
    if global_clipnorm is not None:
        return ClipNorm(global_clipnorm)
    if clipvalue is not None:
        return ClipValue(clipvalue)
    return None


def policy_from_optimizer(optimizer: Any) -> Policy | None:
    """The gradguard policy a Keras optimizer's clipping arguments amount to."""
    optimizer = _clipping_optimizer(optimizer)
    return policy_from_keras(
        getattr(optimizer, "clipnorm", None) or None,
        getattr(optimizer, "global_clipnorm", None) or None,
        getattr(optimizer, "clipvalue", None) or None,
    )


def keras_clip_kwargs(policy: Policy | None) -> dict[str, float]:
    """Keras optimizer arguments for a fixed gradguard policy (``{}`` for ``None``)."""
    if policy is None:
        return {}
    if isinstance(policy, ClipNorm):
        if policy.norm_type != 2.0:
            raise ValueError(f"policy: Keras clips L2 norms only, got norm_type={policy.norm_type}")
        return {"global_clipnorm": policy.max_norm}
    if isinstance(policy, ClipTensorNorm):
        return {"clipnorm": policy.max_norm}
    if isinstance(policy, ClipValue):
        return {"clipvalue": policy.clip_value}
    raise ValueError(
        f"policy: {type(policy).__name__} has no Keras equivalent; "
        "use ClipNorm, ClipTensorNorm or ClipValue"
    )


# ------------------------------------------------------------------- the on-device log
def _is_loss_scaled(optimizer: Any) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def _clipping_optimizer(optimizer: Any) -> Any:
    """The optimizer that clips and updates (a LossScaleOptimizer's inner one)."""
    return optimizer.inner_optimizer if _is_loss_scaled(optimizer) else optimizer


def _name(path: str, model_name: str) -> str:
    """``"sequential/hidden/kernel"`` → ``"hidden.kernel"`` (dotted, model name dropped)."""
    prefix = model_name + "/"
    if path.startswith(prefix):
        path = path[len(prefix) :]
    return path.replace("/", ".")


class GradientRecorder(keras.callbacks.Callback):
    """Record every optimizer step's gradient norms during ``model.fit``.

    Works on the TensorFlow, JAX and PyTorch backends of Keras 3.

    Args:
        store: run directory or ``.db`` path; ``None`` for ``runs/<timestamp>``.
        log_every: batches per read of the on-device buffer and flush to the store.
        sinks: further sinks (TensorBoard, W&B, MLflow, console).
        health: run the health rules at each flush (``True``, a ``HealthConfig``, or ``False``).

    Steps count optimizer updates (with ``gradient_accumulation_steps=k``, one per ``k``
    batches), skipped ones included. The run store is closed at the end of ``fit``; use
    one callback per ``fit`` call.
    """

    def __init__(
        self,
        store: RunStore | str | os.PathLike[str] | None = None,
        *,
        log_every: int = 50,
        sinks: Sequence[Sink] = (),
        health: Any = True,
    ) -> None:
        super().__init__()
        self.host = HostRecorder(
            store,
            sinks=sinks,
            log_every=log_every,
            health=health,
            config={"framework": "keras", "backend": keras.backend.backend()},
        )
        self.log_every = self.host.log_every
        self._log: StepLog | None = None
        self._restore: list[tuple[Any, str, Any]] = []
        self._names: tuple[str, ...] = ()
        self._last = 0
        self._calls = 0
        self._threshold = math.inf
        self._warned = False
        self.transfers = 0

    # -- fit hooks --------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model, outer = self.model, self.model.optimizer
        variables = list(model.trainable_variables)
        if not outer.built:
            outer.build(variables)
        inner = _clipping_optimizer(outer)
        stale = getattr(vars(inner).get("_clip_gradients"), "gradguard_recorder", None)
        if stale is not None and stale is not self:
            stale.close()  # left hooked by a fit that raised: keep its rows, unhook it
        self._names = tuple(_name(v.path, model.name) for v in variables)
        policy = policy_from_optimizer(outer)
        self.host.recorder.config["policy"] = repr(policy)
        self._threshold = policy.max_norm if isinstance(policy, ClipNorm) else math.inf
        self.host.start(self._names, [tuple(v.shape) for v in variables])
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        capacity = self.log_every * spe + spe
        threaded = keras.backend.backend() == "jax"
        try:
            self._log = StepLog(inner, len(variables), capacity, threaded=threaded)
            self._install(outer, inner, len(variables))
        except Exception as error:  # an optimizer this callback does not know: train on
            self._fault(repr(error))
            self._uninstall()
            return
        # A train function traced before (an earlier fit) would not see the hooks.
        model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._calls += 1
        if self._calls % self.log_every == 0:
            self._drain()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.close()

    def close(self) -> None:
        """Record the steps still on the device, unhook the optimizer, close the store.

        Runs at the end of ``fit``. When ``fit`` raised, call it yourself (or start the
        next ``fit``, which calls it): the steps since the last read are recorded then.
        """
        try:
            self._drain()
        finally:
            self._uninstall()
            self.host.close()

    def _fault(self, problem: str) -> None:
        """Warn once that steps are not recorded; training goes on."""
        if not self._warned:
            self._warned = True
            _warn.warn(f"gradguard: Keras steps are not recorded: {problem}")

    # -- the hooks in the train step --------------------------------------------------

    def _patch(self, owner: Any, attribute: str, replacement: Any) -> None:
        self._restore.append((owner, attribute, owner.__dict__.get(attribute, _ABSENT)))
        replacement.gradguard_recorder = self
        setattr(owner, attribute, replacement)

    def _install(self, outer: Any, inner: Any, n: int) -> None:
        log = self._log
        assert log is not None
        original_clip = inner._clip_gradients
        pending: dict[str, Any] = {}  # the loss-scaled gradients' squares and the scale

        def clip_and_record(grads):
            out = original_clip(grads)
            if len(grads) != n or any(g is None for g in grads):
                self._fault(f"{n - len(grads)} trainable variables have no gradient")
                return out  # Keras dropped them: rows cannot be aligned with the names
            try:
                sq = squares(grads)
                after = ops.sqrt(ops.sum(squares(out)))
                scale = pending.get("scale", math.nan)
                lr = inner.learning_rate
                log.write(ops.sqrt(ops.sum(sq)), after, lr, 0.0, scale, ops.sqrt(sq))
            except Exception as error:  # recording must never stop training
                self._fault(repr(error))
            return out

        self._patch(inner, "_clip_gradients", clip_and_record)
        if log.optimizer is not None:  # checkpoints hold the optimizer's state, not the log
            for optimizer in {id(outer): outer, id(inner): inner}.values():
                for method in ("save_own_variables", "load_own_variables"):
                    self._patch(optimizer, method, log.while_hidden(getattr(optimizer, method)))
        if _is_loss_scaled(outer):
            self._install_loss_scaled(outer, inner, n, pending)

    def _install_loss_scaled(self, outer: Any, inner: Any, n: int, pending: dict) -> None:
        """Record LossScaleOptimizer's own skips (non-finite scaled gradients)."""
        log = self._log
        assert log is not None

        def write_skip():
            sq, scale = pending["squares"], pending["scale"]
            norms = ops.divide(ops.sqrt(sq), scale)
            total = ops.divide(ops.sqrt(ops.sum(sq)), scale)
            log.write(total, math.nan, inner.learning_rate, 1.0, scale, norms)

        def remember(grads, scale):
            if len(grads) == n and all(g is not None for g in grads):
                pending.update(squares=squares(grads), scale=scale)

        if keras.backend.backend() == "jax":
            stateless_apply = outer.stateless_apply
            handle_skip = outer._stateless_handle_non_finite_grads

            def apply(optimizer_variables, grads, trainable_variables):
                at = index_of(outer.variables, outer.dynamic_scale)
                remember(grads, optimizer_variables[at])
                try:
                    return stateless_apply(optimizer_variables, grads, trainable_variables)
                finally:
                    pending.clear()

            def skip(optimizer_variables, trainable_variables):
                trainable, values = handle_skip(optimizer_variables, trainable_variables)
                if "squares" not in pending:
                    return trainable, values
                mapping = list(zip(outer.variables, values))
                with keras.StatelessScope(state_mapping=mapping) as scope:
                    write_skip()
                return trainable, [scope.get_current_value(v) for v in outer.variables]

            self._patch(outer, "stateless_apply", apply)
            self._patch(outer, "_stateless_handle_non_finite_grads", skip)
        else:
            stateful_apply = outer.apply
            handle_skip = outer._stateful_handle_non_finite_grads

            def apply(grads, trainable_variables=None):
                remember(list(grads), ops.copy(outer.dynamic_scale.value))
                try:
                    return stateful_apply(grads, trainable_variables)
                finally:
                    pending.clear()

            def skip():
                handle_skip()
                if "squares" in pending:
                    write_skip()

            self._patch(outer, "apply", apply)
            self._patch(outer, "_stateful_handle_non_finite_grads", skip)

    def _uninstall(self) -> None:
        for owner, attribute, before in reversed(self._restore):
            if before is _ABSENT:
                owner.__dict__.pop(attribute, None)
            else:
                setattr(owner, attribute, before)
        self._restore.clear()
        if self._log is not None:
            self._log.remove()
            self._log = None
            # The next fit traces a train step without the hooks.
            self.model.make_train_function(force=True)

    # -- reading the log --------------------------------------------------------------

    def _drain(self) -> None:
        """Read the buffer once and record the rows written since the last read."""
        if self._log is None:
            return
        try:
            steps, values = self._log.read(self.model)
        except Exception as error:  # recording must never stop training
            self._fault(repr(error))
            return
        self.transfers += 1
        for i in np.argsort(steps, kind="stable"):
            step = int(steps[i])
            if step > self._last:
                self._record(step, values[i])
                self._last = step
        self.host.flush()

    def _record(self, step: int, row: np.ndarray) -> None:
        total, after = float(row[layout.TOTAL]), float(row[layout.CLIPPED])
        skipped = bool(row[layout.SKIPPED])
        scale = float(row[layout.SCALE])
        norms = row[layout.HEAD :].astype(np.float64)
        ok = total > 0 and math.isfinite(total) and not skipped
        coef = min(after / total, 1.0) if ok else math.nan if skipped else 1.0
        self.host.record(
            step,
            total_norm=total,
            clipped_norm=after,
            clip_coef=coef,
            threshold=self._threshold,
            skipped=skipped,
            reason=int(SkipReason.AMP_OVERFLOW) if skipped else 0,
            lr=float(row[layout.LR]),
            loss_scale=None if math.isnan(scale) else scale,
            tensor_norms=norms.tolist(),
            clipped=ok and after < total * (1 - 1e-6),
        )
        if skipped:
            bad = [name for name, v in zip(self._names, norms) if not math.isfinite(v)]
            self.host.event(skip_event(step, SkipReason.AMP_OVERFLOW, bad))


__all__ = ["GradientRecorder", "keras_clip_kwargs", "policy_from_keras", "policy_from_optimizer"]

"""Keras 3 front-end: a ``model.fit`` callback that records gradient health, and the
mapping between Keras's clipping arguments and gradguard policies.

Keras's clipping arguments are gradguard's fixed policies: ``clipnorm=c`` clips each
gradient tensor on its own (:class:`~gradguard.ClipTensorNorm`), ``global_clipnorm=c``
clips all of them together (:class:`~gradguard.ClipNorm`), ``clipvalue=v`` clamps every
element (:class:`~gradguard.ClipValue`). Keras's coefficient is ``c / max(‖g‖, c)``;
gradguard's (torch's) adds ``1e-6`` to the norm, a relative difference below 1e-6.

:class:`GradientRecorder` wraps the optimizer's gradient-clipping step, so it sees the
real gradients (after loss-scale unscaling and accumulation, right before the update).
Inside the compiled train step it writes one row per step (step, norm before and after
clipping, learning rate, per-variable norms) into a small ring-buffer variable; the
callback reads the buffer once every ``log_every`` steps (one device→host transfer) and
records the rows to the same run store a PyTorch run writes. Tested with the
TensorFlow backend; on the JAX backend Keras runs the step statelessly and the buffer
writes would not survive it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from ..policies import ClipNorm, ClipTensorNorm, ClipValue, Policy
from ..record import RunStore, Sink
from ._host import HostRecorder

_HEAD = 4  # step, total norm, clipped norm, learning rate


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


# ------------------------------------------------------------------- recording
def _sq(g: Any) -> Any:
    g = ops.cast(g, "float32")
    return ops.sum(ops.square(g))


def _name(path: str, model_name: str) -> str:
    """``"sequential/hidden/kernel"`` → ``"hidden.kernel"`` (dotted, model name dropped)."""
    prefix = model_name + "/"
    if path.startswith(prefix):
        path = path[len(prefix) :]
    return path.replace("/", ".")


class GradientRecorder(keras.callbacks.Callback):
    """Record every training step's gradient norms during ``model.fit``.

    Args:
        store: run directory or ``.db`` path; ``None`` for ``runs/<timestamp>``.
        log_every: steps per read of the on-device buffer and flush to the store.
        sinks: further sinks (TensorBoard, W&B, MLflow, console).
        health: run the health rules at each flush (``True``, a ``HealthConfig``, or ``False``).

    The run store is closed at the end of ``fit``; use one callback per ``fit`` call.
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
        self._buffer: Any = None
        self._original: Any = None
        self._last = 0
        self._calls = 0
        self._threshold = math.inf
        self.transfers = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        model, optimizer = self.model, self.model.optimizer
        variables = list(model.trainable_variables)
        names = tuple(_name(v.path, model.name) for v in variables)
        policy = policy_from_optimizer(optimizer)
        self.host.recorder.config["policy"] = repr(policy)
        self._threshold = policy.max_norm if isinstance(policy, ClipNorm) else math.inf
        self.host.start(names, [tuple(v.shape) for v in variables])
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        capacity = self.log_every * spe + spe
        self._buffer = keras.Variable(
            ops.zeros((capacity, _HEAD + len(variables)), "float32"),
            trainable=False,
            name="gradguard_grad_buffer",
        )
        self._original = optimizer._clip_gradients
        buffer, original, n = self._buffer, self._original, len(variables)

        def clip_and_record(grads):
            out = original(grads)
            if len(grads) != n or any(g is None for g in grads):
                return out  # filtered or missing gradients: rows cannot be aligned
            sq = ops.stack([_sq(g) for g in grads])
            after = ops.sqrt(ops.sum(ops.stack([_sq(g) for g in out])))
            step = ops.cast(optimizer.iterations, "int32")
            lr = ops.cast(optimizer.learning_rate, "float32")
            head = ops.stack(
                [ops.cast(step + 1, "float32"), ops.sqrt(ops.sum(sq)), after, ops.reshape(lr, ())]
            )
            row = ops.concatenate([head, ops.sqrt(sq)])[None, :]
            buffer.assign(ops.slice_update(buffer, (step % capacity, 0), row))
            return out

        optimizer._clip_gradients = clip_and_record

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._calls += 1
        if self._calls % self.log_every == 0:
            self._drain()

    def on_train_end(self, logs: dict | None = None) -> None:
        try:
            self._drain()
        finally:
            optimizer = self.model.optimizer
            if self._original is not None:
                optimizer._clip_gradients = self._original
                self._original = None
            self.host.close()

    def _drain(self) -> None:
        """Read the buffer once and record the rows written since the last read."""
        if self._buffer is None:
            return
        rows = ops.convert_to_numpy(self._buffer.value)
        self.transfers += 1
        fresh = sorted((r for r in rows if r[0] > self._last), key=lambda r: r[0])
        for r in fresh:
            step, total, after, lr = int(r[0]), float(r[1]), float(r[2]), float(r[3])
            ok = total > 0 and math.isfinite(total)
            coef = min(after / total, 1.0) if ok else 1.0
            self.host.record(
                step,
                total_norm=total,
                clipped_norm=after,
                clip_coef=coef,
                threshold=self._threshold,
                lr=lr,
                tensor_norms=r[_HEAD:].tolist(),
                clipped=ok and after < total * (1 - 1e-6),
            )
            self._last = step
        self.host.flush()


__all__ = ["GradientRecorder", "keras_clip_kwargs", "policy_from_keras", "policy_from_optimizer"]

"""The policy contract: from one step's inputs to a :class:`Decision`, over explicit state.

A policy is written once, as a pure update in the spirit of optax's gradient
transformations::

    state = policy.init(inputs, xp)                     # the initial state
    decision, state = policy.update(state, inputs, xp)  # one step

``inputs`` is a :class:`StepInputs` (norms, loss, learning rate, step index) and ``xp``
the array operations of :mod:`gradguard.ops` (NumPy on the host, torch on a device, JAX
under jit), so the torch :class:`~gradguard.Guard`, the Paddle front-end and the JAX
front-end run the same lines. :meth:`Policy.decide` is the stateful form the torch side
uses: it keeps the state on the policy, and ``state_dict()``/``load_state_dict()`` make a
resumed run take the same decisions. No update syncs with the host.

Norms are measured once per step, before any policy acts. Decisions compose: global
and per-tensor scales multiply, skip flags are or-ed, and in-place transforms (value
clipping, AGC) run in chain order. Every policy only ever scales gradients down, so a
composed clip is never looser than any of its parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .. import ops as _ops
from ..ops import Array, Ops
from ..stats import GradStats
from .inputs import StepInputs

#: An in-place gradient transformation: ``fn(params, grads)`` (torch only).
Transform = Callable[[Sequence[Tensor], Sequence[Tensor]], None]


@dataclass(slots=True)
class Decision:
    """What to do with this step's gradients; every array is 0-d unless stated.

    Attributes:
        scale: multiplier for every gradient (global-norm clipping), or ``None``.
        tensor_scale: per-tensor multipliers, shape ``(n,)``, or ``None``.
        skip: boolean: leave parameters and optimizer state untouched this step.
        reason: :class:`SkipReason` code of the skip (meaningful where ``skip``).
        threshold: the norm threshold in force, for recording (``inf`` when none).
        transforms: in-place transformations, applied in order before the scales.
    """

    scale: Array | None = None
    tensor_scale: Array | None = None
    skip: Array | None = None
    reason: Array | None = None
    threshold: Array | None = None
    transforms: Sequence[Transform] = ()

    def then(self, other: Decision, xp: Ops | None = None) -> Decision:
        """Compose with a decision taken after this one (see the module docstring)."""
        xp = xp or _namespace(self, other)
        scale, tensor_scale = self.scale, self.tensor_scale
        skip, reason, threshold = self.skip, self.reason, self.threshold
        if other.scale is not None:
            scale = other.scale if scale is None else scale * other.scale
        if other.tensor_scale is not None:
            tensor_scale = (
                other.tensor_scale if tensor_scale is None else tensor_scale * other.tensor_scale
            )
        if other.skip is not None:
            if skip is None:
                skip, reason = other.skip, other.reason
            else:  # the first skipping policy names the reason
                assert xp is not None
                reason = xp.where(skip, reason, other.reason)
                skip = skip | other.skip
        if other.threshold is not None:
            if threshold is None:
                threshold = other.threshold
            else:
                assert xp is not None
                threshold = xp.minimum(threshold, other.threshold)
        transforms = self.transforms
        if other.transforms:
            transforms = [*transforms, *other.transforms]
        return Decision(scale, tensor_scale, skip, reason, threshold, transforms)

    def filled(self, xp: Ops, count: int | None) -> Decision:
        """Every array field set (neutral where unset): one structure for traced code."""
        like = next((a for a in self.arrays() if a is not None), None)
        one = xp.scalar(1.0, like)
        return replace(
            self,
            scale=one if self.scale is None else self.scale,
            tensor_scale=(
                xp.full(count or 0, 1.0, like) if self.tensor_scale is None else self.tensor_scale
            ),
            skip=xp.flag(False, like) if self.skip is None else self.skip,
            reason=xp.code(0, like) if self.reason is None else self.reason,
            threshold=xp.scalar(math.inf, like) if self.threshold is None else self.threshold,
        )

    def in_library(self, xp: Ops) -> Decision:
        """This decision with arrays from another library (a policy written for torch
        only, run by a guard that decides on the host) moved into ``xp``'s."""
        if xp is _ops.NUMPY:
            for name in ("scale", "tensor_scale", "skip", "reason", "threshold"):
                value = getattr(self, name)
                if isinstance(value, Tensor):
                    setattr(self, name, _ops.NUMPY.asarray(value))
        return self

    def arrays(self) -> tuple[Any, ...]:
        """The array fields, in declaration order (for pytree registration)."""
        return self.scale, self.tensor_scale, self.skip, self.reason, self.threshold

    @classmethod
    def from_arrays(cls, transforms: tuple[Transform, ...], arrays: Sequence[Any]) -> Decision:
        return cls(*arrays, transforms=tuple(transforms))


def _namespace(*decisions: Decision) -> Ops | None:
    for decision in decisions:
        for array in decision.arrays():
            if array is not None:
                return _ops.namespace_of(array)
    return None


class Policy:
    """Base class: subclasses implement :meth:`update` (and :meth:`init` if they keep state).

    A stateful policy names its state type in ``State`` (a ``NamedTuple`` of arrays and
    ints); :meth:`state_dict` saves its fields as torch tensors and ints, and fields in
    ``finite_fields`` must be finite when loaded.
    """

    State: ClassVar[type | None] = None
    finite_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether :attr:`StepInputs.weight_norm` is read: the guard then measures the
    #: parameters' norm at each step where the optimizer is SGD.
    reads_weight_norm: bool = False
    #: Whether a rule of the policy acts only when the step's loss is given: the guard
    #: warns once when a step that rule would judge comes without one.
    needs_loss: bool = False
    #: Whether :meth:`update` reads only the inputs' arrays and numbers and returns no
    #: transforms, so that on a device it can run as one compiled graph
    #: (:attr:`StepInputs.compile`).
    compilable: ClassVar[bool] = False

    # The state of the stateful form, in the library it was last used with.
    _state: Any = None
    _state_xp: Ops | None = None
    _state_device: torch.device | None = None

    def init(self, inputs: StepInputs, xp: Ops) -> Any:
        """The state before the first step (``None`` for a stateless policy)."""
        return None

    def update(self, state: Any, inputs: StepInputs, xp: Ops) -> tuple[Decision, Any]:
        """Decide one step: ``(decision, new state)``. Pure; must not sync with the host."""
        raise NotImplementedError(f"{type(self).__name__} implements neither update nor decide")

    def decide(
        self, inputs: StepInputs | GradStats, params: Sequence[Tensor] = (), **extra: Any
    ) -> Decision:
        """Decide one step and keep the new state on the policy.

        ``inputs`` may be the :class:`~gradguard.GradStats` of :func:`gradguard.measure`
        (with ``params`` and optional ``loss``, ``lr``, ``step``, ``xp``), as in a unit
        test: the decision is then made of torch tensors on the gradients' device.
        """
        if isinstance(inputs, GradStats):
            inputs = StepInputs.from_stats(inputs, params, **extra)
        require_grads(inputs, self)
        return self._decide(inputs)

    def _decide(self, inputs: StepInputs) -> Decision:
        """One step of the stateful form, on checked inputs."""
        xp = inputs.xp
        state = self._state_in(xp, inputs.total_norm)
        if state is None and self.State is not None:
            state = self.init(inputs, xp)
        if inputs.compile and self.compilable and xp is _ops.TORCH:
            from .. import _compiled

            decision, self._state = _compiled.update(self, state, inputs)
        else:
            decision, self._state = self.update(state, inputs, xp)
        self._state_xp = xp
        return decision

    # -- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A copy of the policy's state: torch tensors (on their device) and ints."""
        if self.State is None:
            return {}
        state = self._state
        return {
            name: None if state is None else _saved(getattr(state, name))
            for name in self.State._fields  # type: ignore[attr-defined]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; raises naming what is wrong."""
        if self.State is None:
            return
        names: tuple[str, ...] = self.State._fields  # type: ignore[attr-defined]
        given = {str(k).lstrip("_"): v for k, v in dict(state).items()}  # older "_name" keys
        missing = [n for n in names if n not in given]
        if missing:
            raise KeyError(
                f"state_dict for {type(self).__name__} lacks {missing}; was it saved from "
                "another policy?"
            )
        if all(given[n] is None for n in names):
            self._state, self._state_xp = None, None
            return
        values = {
            n: _loaded(type(self).__name__, n, given[n], n in self.finite_fields) for n in names
        }
        self._state = self.State(**values)
        self._state_xp = None  # converted to the library in use at the next step

    def _state_in(self, xp: Ops, like: Array) -> Any:
        """The stored state, moved to ``xp`` (and to ``like``'s device) when needed."""
        state = self._state
        if state is None:
            return None
        if xp is _ops.TORCH:
            device = like.device
            if self._state_xp is xp and self._state_device == device:
                return state
        elif self._state_xp is xp:
            return state
        else:
            device = None
        state = type(state)(*(_convert(v, xp, like) for v in state))
        self._state, self._state_xp, self._state_device = state, xp, device
        return state

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({params})"

    def _config(self) -> dict[str, Any]:
        return {}


def _saved(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value, copy=True))
    if hasattr(value, "__array__") and not isinstance(value, (int, float)):
        return torch.from_numpy(np.array(value, copy=True))  # a JAX array
    return value


def _loaded(policy: str, name: str, value: Any, finite: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, Tensor) and value.dtype.is_floating_point:
        if finite and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict for {policy}: {name} holds NaN or inf")
        return value.detach().clone()
    if isinstance(value, Tensor):
        value = int(value)
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"state_dict for {policy}: {name} must be a tensor or an int, got {value!r}"
        )
    if value < 0:
        raise ValueError(f"state_dict for {policy}: {name} must be >= 0, got {value}")
    return int(value)


def _convert(value: Any, xp: Ops, like: Array) -> Any:
    if value is None or isinstance(value, int):
        return value
    return xp.asarray(value, like)


def require_grads(inputs: StepInputs | GradStats, policy: Policy) -> None:
    """Raise when a policy is fed no gradients at all."""
    if len(inputs) == 0:
        raise ValueError(
            f"{type(policy).__name__}.decide got no gradients: every parameter's .grad is None. "
            "Call loss.backward() before the guard step, and check requires_grad."
        )


def finite_or(xp: Ops, value: Array, fallback: Array | float) -> Array:
    """``value`` where finite, else ``fallback``: keeps NaN/inf out of policy histories."""
    return xp.where(xp.isfinite(value), value, fallback)

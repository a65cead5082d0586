"""Per-example gradient norms: from Opacus's ``p.grad_sample`` or from ``torch.func``.

DP-SGD clips every example's gradient, so the health of a private run is the
distribution of per-example norms, not the norm of the batch gradient. Both sources
give a :class:`PerSampleNorms`: an ``(examples, tensors)`` matrix of per-tensor norms on
the device, whose rows' norms are the per-example norms DP-SGD clips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import PrivacyModelError
from .model_check import type_problems

DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class PerSampleNorms:
    """Per-example gradient norms of one step (device tensors, no host sync to build).

    Attributes:
        layer: ``(n, P)`` L2 norms of each example's gradient in each of ``P`` tensors.
        names: the ``P`` tensor names (empty when unknown).
    """

    layer: Tensor
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        layer = self.layer
        if not isinstance(layer, Tensor) or layer.dim() != 2 or layer.is_complex():
            raise TypeError("layer must be a real (examples, tensors) tensor of norms")
        if not layer.is_floating_point():
            raise TypeError(f"layer must hold floating-point norms, got {layer.dtype}")
        self.names = tuple(self.names)
        if self.names and len(self.names) != layer.shape[1]:
            raise ValueError(f"names: {len(self.names)} names for {layer.shape[1]} tensors")

    @property
    def total(self) -> Tensor:
        """``(n,)`` per-example norms over all tensors: what flat DP clipping compares."""
        return torch.linalg.vector_norm(self.layer, 2, dim=1)

    def __len__(self) -> int:
        return int(self.layer.shape[0])

    def fraction_clipped(self, clip_norm: float | Tensor) -> Tensor:
        """Share of examples whose norm exceeds ``clip_norm`` (0-d; NaN when empty)."""
        total = self.total
        return (total > clip_norm).to(total.dtype).mean()

    def quantiles(self, q: Sequence[float] = DEFAULT_QUANTILES, by_layer: bool = False) -> Tensor:
        """Quantiles of the per-example norms: ``(len(q),)``, or ``(P, len(q))`` by layer."""
        qs = torch.tensor(list(q), dtype=torch.float32, device=self.layer.device)
        if len(self) == 0:
            shape = (self.layer.shape[1], len(qs)) if by_layer else (len(qs),)
            return torch.full(shape, float("nan"), device=self.layer.device)
        if by_layer:
            return torch.quantile(self.layer.float(), qs, dim=0).T
        return torch.quantile(self.total.float(), qs)

    @staticmethod
    def cat(parts: Sequence[PerSampleNorms]) -> PerSampleNorms:
        """Stack the examples of several micro-batches of one step."""
        if not parts:
            raise ValueError("parts: nothing to concatenate")
        width = parts[0].layer.shape[1]
        for i, part in enumerate(parts):
            if part.layer.shape[1] != width or part.names != parts[0].names:
                raise ValueError(f"parts[{i}] holds other tensors than parts[0]")
        return PerSampleNorms(torch.cat([p.layer for p in parts]), parts[0].names)


def norms_of(
    per_sample_grads: Sequence[Tensor],
    names: Sequence[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> PerSampleNorms:
    """Per-example norms of per-example gradients ``[(n, *shape), ...]`` (one per tensor)."""
    grads = list(per_sample_grads)
    if not grads:
        raise ValueError("per_sample_grads: no per-example gradients given")
    if names and len(names) != len(grads):
        raise ValueError(f"names: {len(names)} names for {len(grads)} per-example gradients")
    n = grads[0].shape[0]
    for i, g in enumerate(grads):
        if g.shape[0] != n:
            raise ValueError(
                f"per_sample_grads[{i}] holds {g.shape[0]} examples but per_sample_grads[0] "
                f"holds {n}"
            )
    device = grads[0].device
    columns = [torch.linalg.vector_norm(_rows(g), 2, dim=1, dtype=dtype).to(device) for g in grads]
    return PerSampleNorms(torch.stack(columns, dim=1), tuple(names))


def _rows(g: Tensor) -> Tensor:
    """``(n, elements)`` view of a per-example gradient; also for ``n == 0``."""
    return g.flatten(1) if g.dim() > 1 else g.unsqueeze(1)


def from_grad_sample(model: nn.Module | Sequence[Tensor]) -> PerSampleNorms:
    """Per-example norms from Opacus's ``p.grad_sample`` after ``backward()``.

    ``model`` is a ``GradSampleModule`` (or the module inside it) or its parameters.
    Accumulated micro-batches (``grad_sample`` lists) are concatenated, as Opacus does.
    """
    if isinstance(model, nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        named = [(n.removeprefix("_module."), p) for n, p in named]
    elif isinstance(model, (Sequence, Iterator)) and not isinstance(model, (str, bytes)):
        named = [(f"parameters[{i}]", p) for i, p in enumerate(model)]
    else:
        raise TypeError(f"model must be an nn.Module or its parameters, got {type(model).__name__}")
    grads, names = [], []
    for name, p in named:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        grads.append(torch.cat(sample) if isinstance(sample, list) else sample)
        names.append(name)
    if not grads:
        raise ValueError(
            "model: no parameter has a grad_sample; wrap the model with Opacus "
            "(GradSampleModule or PrivacyEngine.make_private) and call backward() first"
        )
    return norms_of(grads, names)


def from_functional(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
) -> PerSampleNorms:
    """Per-example norms with ``torch.func`` (``vmap(grad(...))``): no Opacus needed.

    ``loss_fn(output, target)`` is applied to one example at a time (with a batch
    dimension of 1), so use the loss you train with, reduced by mean or sum alike.
    The model's parameters and ``.grad`` are left untouched. ``chunk_size`` bounds the
    memory of the vmapped backward. Give a module without Opacus's hooks (inside a
    ``GradSampleModule`` use :func:`from_grad_sample`).
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor) or value.dim() == 0:
            raise TypeError(f"{name} must be a batch tensor (examples first)")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs hold {inputs.shape[0]} examples but targets {targets.shape[0]}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    problems = type_problems(model, training_only=True)
    if problems:
        raise PrivacyModelError(problems)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model: no parameter requires grad")
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(
        params, inputs, targets
    )
    names = list(params)
    return norms_of([per_example[n] for n in names], names)

"""Turn whatever a user passes as "parameters" into a list of gradients.

Accepted everywhere: an ``nn.Module``, a single tensor, an iterable of tensors,
or an iterable of ``(name, tensor)`` pairs such as ``model.named_parameters()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeAlias

import torch
from torch import Tensor, nn

ParamsLike: TypeAlias = nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


def named_params(parameters: ParamsLike) -> tuple[list[Tensor], list[str] | None]:
    """Return the parameters as a list, with their names when the input carries them."""
    if isinstance(parameters, nn.Module):
        pairs = list(parameters.named_parameters())
        return [p for _, p in pairs], [n for n, _ in pairs]
    if isinstance(parameters, Tensor):
        return [parameters], None
    try:
        items = list(parameters)
    except TypeError:
        raise TypeError(
            "parameters must be a module, a tensor, or an iterable of tensors or "
            f"(name, tensor) pairs, got {type(parameters).__name__}"
        ) from None
    if items and isinstance(items[0], tuple):
        names: list[str] = []
        tensors: list[Tensor] = []
        for index, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
                raise TypeError(
                    f"parameters[{index}] must be a (name, tensor) pair like those of "
                    f"named_parameters(), got {type(item).__name__}"
                )
            names.append(str(item[0]))
            tensors.append(item[1])
        return tensors, names
    for index, item in enumerate(items):
        if not isinstance(item, Tensor):
            raise TypeError(
                f"parameters[{index}] must be a torch.Tensor, got {type(item).__name__}"
            )
    return items, None


def check_grad(grad: Tensor, where: str) -> None:
    """Reject gradients gradguard cannot measure, naming the parameter."""
    if grad.layout != torch.strided:
        raise TypeError(
            f"parameters: the gradient of {where} has layout {grad.layout}; gradguard "
            "supports dense (strided) gradients only. Densify it with grad.to_dense() "
            "or leave this parameter out."
        )
    if not (grad.dtype.is_floating_point or grad.dtype.is_complex):
        raise TypeError(
            f"parameters: the gradient of {where} has dtype {grad.dtype}; gradients must be "
            "floating point (or complex)"
        )


class Collected(NamedTuple):
    """Parameters that have a gradient, their gradients and names, and how many were given."""

    params: list[Tensor]
    grads: list[Tensor]
    names: list[str] | None
    given: int


_STRIDED = torch.strided
_MEASURABLE = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
)


def collect(params: Sequence[Tensor], names: Sequence[str] | None) -> Collected:
    """The parameters of ``params`` that have a gradient (``grad is None`` skipped), checked.

    When every parameter has one, ``params`` and ``names`` themselves are returned.
    """
    grads = [p.grad for p in params]
    complete = True
    for index, grad in enumerate(grads):
        if grad is None:
            complete = False
        elif grad.dtype not in _MEASURABLE or grad.layout is not _STRIDED:
            label = repr(names[index]) if names is not None else f"parameters[{index}]"
            check_grad(grad, label)
    if complete:  # (``None in grads`` would compare tensors with None)
        return Collected(params, grads, names, len(params))  # type: ignore[arg-type]
    kept = [i for i, g in enumerate(grads) if g is not None]
    return Collected(
        [params[i] for i in kept],
        [grads[i] for i in kept],
        None if names is None else [names[i] for i in kept],
        len(params),
    )


def grads_with_names(parameters: ParamsLike) -> Collected:
    """Collect the parameters with a gradient from anything :func:`named_params` accepts."""
    return collect(*named_params(parameters))

"""Parameters grouped by the module that owns them: the one "layer" view of every room.

Torch-free, so the device half (:meth:`gradguard.GradStats.by_module`), the health
rules and the report all group parameter names the same way:
``"encoder.0.attn.weight"`` belongs to ``"encoder.0.attn"``. A parameter held directly
by the root module (``"weight"`` of a bare ``nn.Linear``, a ViT's ``"pos_embedding"``)
is a group of its own, named by the parameter.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence


def dotted_name(parts: Iterable[str]) -> str:
    """A parameter name from the keys on its path (``("params", "Dense_0", "kernel")`` →
    ``"params.Dense_0.kernel"``): the names front-ends give pytree or Keras leaves, which
    :func:`module_of` then groups. A leaf that is the whole tree is ``"<root>"``."""
    return ".".join(str(p) for p in parts) or "<root>"


def module_of(name: str, depth: int | None = None) -> str:
    """The group of parameter ``name``: its owning module, or its first ``depth`` parts.

    ``depth=None`` drops the last dotted component (``"enc.0.weight"`` → ``"enc.0"``);
    ``depth=k`` keeps the first ``k`` (``depth=1``: ``"enc.0.weight"`` → ``"enc"``). An
    undotted name is its own group.
    """
    parts = name.split(".")
    if len(parts) == 1:
        return name
    kept = parts[:-1] if depth is None else parts[: min(depth, len(parts) - 1)]
    return ".".join(kept)


@functools.lru_cache(maxsize=64)
def _group_index(
    names: tuple[str, ...], depth: int | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    order: dict[str, int] = {}
    index = tuple(order.setdefault(module_of(n, depth), len(order)) for n in names)
    return tuple(order), index


def group_index(
    names: Sequence[str], depth: int | None = None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(groups, index)``: the groups in model order, and each name's group position.

    ``index[i]`` is the position in ``groups`` of ``names[i]``'s group; combine member
    norms with it (the p-norm of the members' norms is the norm of the group).
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be an int >= 1 or None, got {depth!r}")
    return _group_index(tuple(names), depth)

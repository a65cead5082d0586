"""Where a non-finite gradient starts: backward order and an opt-in forward check.

Once a NaN appears during backward it flows into every gradient computed after it,
i.e. every parameter closer to the input, so the set of NaN parameters says little.
The first parameter *in backward order* whose gradient is non-finite is the one
nearest the point where the NaN was made. :class:`BackwardOrder` learns that order
once, from the first backward pass, then removes its hooks.

This is the only module of :mod:`gradguard.health` that imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class BackwardOrder:
    """The order in which a module's parameter gradients are accumulated in backward.

    Attach it before the first ``backward()``; the order is learned from that pass via
    ``Tensor.register_post_accumulate_grad_hook``. The hooks are removed as soon as
    every trainable parameter has reported, or at the start of the next forward
    pass when some parameters got no gradient, so later steps pay nothing.

    Example::

        order = BackwardOrder(model)
        ...  # first training step
        stats = gradguard.measure(model)
        origin = order.first_nonfinite(stats.nonfinite_names())
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.names: tuple[str, ...] = tuple(
            name for name, p in module.named_parameters() if p.requires_grad
        )
        if not self.names:
            raise ValueError("module has no parameters that require grad")
        self._seen: list[str] = []
        self._seen_set: set[str] = set()
        self._order: tuple[str, ...] | None = None
        self._handles: list[RemovableHandle] = []
        for name, param in module.named_parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
        self._handles.append(module.register_forward_pre_hook(self._on_forward))

    def _hook(self, name: str):
        def record(_: Tensor) -> None:
            if name not in self._seen_set:
                self._seen_set.add(name)
                self._seen.append(name)
                if len(self._seen) == len(self.names):
                    self._finish()

        return record

    def _on_forward(self, *_: object) -> None:
        if self._seen:  # a backward has run since the hooks went in
            self._finish()

    def _finish(self) -> None:
        if self._order is None:
            self._order = tuple(self._seen)
        # Inside backward, remove the hooks once it ends: FSDP2 iterates a parameter's hook
        # dict while calling them, and removing one mid-iteration breaks that loop.
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self.remove)
        except RuntimeError:  # not inside a backward pass
            self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent); a partially seen order is kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._order is None and self._seen:
            self._order = tuple(self._seen)

    @property
    def attached(self) -> bool:
        """Whether hooks are still installed (only until the first backward is seen)."""
        return bool(self._handles)

    @property
    def learned(self) -> bool:
        """Whether a backward pass has been observed."""
        return self._order is not None or bool(self._seen)

    @property
    def order(self) -> tuple[str, ...]:
        """Parameter names in backward accumulation order (empty before any backward)."""
        return self._order if self._order is not None else tuple(self._seen)

    def unreached(self) -> tuple[str, ...]:
        """Parameters that require grad but got no gradient in the observed backward pass.

        Known once the order is complete (the next forward pass after the first backward);
        empty before. They are detached, run under ``no_grad`` or unused in forward.
        """
        if self._order is None:
            return ()
        seen = set(self._order)
        return tuple(name for name in self.names if name not in seen)

    def first_nonfinite(
        self, names_or_flags: Iterable[str] | Sequence[bool] | Tensor
    ) -> str | None:
        """The first parameter, in backward order, whose gradient is non-finite.

        Args:
            names_or_flags: names of the parameters with non-finite gradients, or
                per-parameter flags (a sequence of bools or a boolean tensor such as
                ``GradStats.nonfinite``) aligned with :attr:`names`.

        Returns:
            the origin's name, or ``None`` when no name is flagged or no backward has
            been observed yet. Flagged names missing from the learned order (they got no
            gradient in the first pass) come after it, in reverse registration order.
        """
        bad = self._flagged(names_or_flags)
        if not bad or not self.learned:
            return None
        for name in self.order:
            if name in bad:
                return name
        for name in reversed(self.names):
            if name in bad:
                return name
        return sorted(bad)[0]

    def _flagged(self, names_or_flags: Iterable[str] | Sequence[bool] | Tensor) -> set[str]:
        if isinstance(names_or_flags, Tensor):
            names_or_flags = names_or_flags.detach().reshape(-1).cpu().tolist()
        items = list(names_or_flags)
        if not items:
            return set()
        if all(isinstance(item, str) for item in items):
            return set(items)
        if all(isinstance(item, bool) for item in items):
            if len(items) != len(self.names):
                raise ValueError(
                    f"names_or_flags has {len(items)} flags for {len(self.names)} parameters"
                )
            return {name for name, flag in zip(self.names, items) if flag}
        raise TypeError("names_or_flags must hold parameter names or booleans")

    def __enter__(self) -> BackwardOrder:
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()


def _has_nonfinite(value: object) -> bool:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex():
            return not bool(torch.isfinite(value).all())
        return False
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


def find_nonfinite_forward(model: nn.Module, *inputs: object, **kwargs: object) -> str | None:
    """Run ``model(*inputs, **kwargs)`` once and name the first module with a non-finite output.

    An opt-in, slow check (one host sync per module), never run by the guard on its own:
    the non-finite finding advises it, and ``gradguard diagnose`` runs it after the fact on
    the batch that failed. Forward hooks fire as each module finishes, so the first report
    is the innermost module where the NaN/inf appeared. Returns ``"<input>"`` when an input
    is already non-finite, the module's qualified name (``""`` for ``model`` itself), or
    ``None`` when every output is finite. Runs under ``torch.no_grad()``; every hook is
    removed afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _has_nonfinite(inputs) or _has_nonfinite(kwargs):
        return "<input>"
    found: list[str] = []

    def hook_for(name: str):
        def check(_: nn.Module, __: object, output: object) -> None:
            if not found and _has_nonfinite(output):
                found.append(name)

        return check

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None

"""Why a model cannot be trained with per-example gradients, named by sub-module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelProblem:
    """One reason a sub-module cannot be trained with per-example gradients."""

    name: str  #: dotted sub-module name ("" for the model itself)
    module: str  #: its class name
    reason: str  #: the reason, as Opacus words it where Opacus knows one
    fix: str = ""  #: how to fix it, where a fix exists

    def __str__(self) -> str:
        where = repr(self.name) if self.name else "the model"
        text = f"{where} ({self.module}): {self.reason}"
        return f"{text} Fix: {self.fix}" if self.fix else text


class PrivacyModelError(ValueError):
    """A model that Opacus (or ``torch.func`` per-example gradients) cannot handle."""

    def __init__(self, problems: list[ModelProblem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"model: cannot compute per-example gradients:\n{lines}")

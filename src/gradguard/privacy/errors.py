"""Why a model cannot be trained with per-example gradients, named by sub-module.

Opacus's ``ModuleValidator`` knows why a layer cannot be trained privately but reports
it without the layer's name (and ``GradSampleModule`` as a list inside an exception);
here every problem carries the sub-module's name, its class and Opacus's own reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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


def _opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def check_model(model: nn.Module, *, opacus: bool | None = None) -> nn.Module:
    """Raise :class:`PrivacyModelError` naming every sub-module that cannot be wrapped.

    With Opacus installed (or ``opacus=True``), runs Opacus's own validators, module by
    module, and keeps their reasons; with ``opacus=False`` checks what ``torch.func``
    per-example gradients need (no layer that mixes the examples of a batch). Returns
    ``model`` unchanged, so ``PrivacyEngine().make_private(module=check_model(m), ...)``
    reads naturally.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    use_opacus = _opacus_available() if opacus is None else opacus
    problems = _opacus_problems(model) if use_opacus else _functional_problems(model)
    if problems:
        raise PrivacyModelError(problems)
    return model


def _opacus_problems(model: nn.Module) -> list[ModelProblem]:
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    problems = []
    if not model.training:
        problems.append(
            ModelProblem(
                "",
                type(model).__name__,
                "IllegalModuleConfigurationError: Model needs to be in training mode",
                "call model.train() before wrapping it",
            )
        )
    for name, sub in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        errors = list(validator(sub)) if validator is not None else []
        if not errors:
            # the per-sample hooks refuse trainable layers that carry buffers
            errors = [e for e in GradSampleModule.validate(sub) if _own(e, sub)]
        fix = (
            "opacus.validators.ModuleValidator.fix(model) replaces it"
            if type(sub) in ModuleValidator.FIXERS
            else ""
        )
        for error in errors:
            reason = f"{type(error).__name__}: {error}".strip()
            problems.append(ModelProblem(name, type(sub).__name__, reason, fix))
    return problems


def _own(error: Exception, sub: nn.Module) -> bool:
    """Whether a ``GradSampleModule.validate(sub)`` error is about ``sub`` itself."""
    return f"(:{sub})" in str(error)


def _functional_problems(model: nn.Module) -> list[ModelProblem]:
    problems = []
    for name, sub in model.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            problems.append(
                ModelProblem(
                    name,
                    type(sub).__name__,
                    "in training mode BatchNorm normalises each example with the statistics "
                    "of its batch, so an example's gradient depends on the others and "
                    "per-example gradients (and their DP clipping) are undefined.",
                    "replace it with GroupNorm or LayerNorm",
                )
            )
    return problems


def wrap_model(model: nn.Module, **kwargs: object) -> nn.Module:
    """``opacus.GradSampleModule(model, **kwargs)``, after :func:`check_model`.

    Opacus errors raised while wrapping come back as :class:`PrivacyModelError`.
    """
    check_model(model, opacus=True)
    from opacus import GradSampleModule

    try:
        return GradSampleModule(model, **kwargs)
    except (NotImplementedError, ValueError) as error:
        problem = ModelProblem("", type(model).__name__, f"{type(error).__name__}: {error}")
        raise PrivacyModelError([problem]) from None

"""Can this model be trained with per-example gradients? Every problem named by sub-module.

Three sources, merged one problem per sub-module (the most specific reason kept):

1. Opacus's own validators, module by module, with Opacus's reasons (Opacus reports
   them without the layer's name, and ``GradSampleModule`` as a list in an exception);
2. the layers known to mix examples or to write batch statistics in training mode,
   *whether or not they have trainable parameters*: Opacus checks trainable modules
   only, so it passes ``BatchNorm1d(affine=False)``;
3. the independence probe (:mod:`.independence`): perturb one example of a small batch
   and name what moved for the others, so custom layers are caught too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import _warn
from .errors import ModelProblem, PrivacyModelError
from .independence import BUFFER_FIX, independence_problems, probe_inputs

BATCHNORM_MIXES = (
    "in training mode BatchNorm normalises each example with the statistics of its batch "
    "(with or without affine parameters), so an example's gradient depends on the others "
    "and per-example gradients (and their DP clipping) are undefined."
)
BATCHNORM_FIX = (
    "replace it with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix(model) "
    "does so only for BatchNorm with affine parameters)"
)
RUNNING_STATS = (
    "with track_running_stats=True it writes running statistics of the batch in training "
    "mode: the trained model then carries statistics of the data that no DP noise covers."
)


def _opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def check_model(
    model: nn.Module,
    example_input: Any = None,
    *,
    opacus: bool | None = None,
    probe: bool = True,
) -> nn.Module:
    """Raise :class:`PrivacyModelError` naming every sub-module that cannot be trained privately.

    With Opacus installed (or ``opacus=True``) Opacus's own validators run too, module by
    module, with their reasons; ``opacus=False`` checks only what per-example gradients
    need. Every layer that mixes the examples of a batch in training mode is flagged, by
    type and by an independence probe on a small batch: ``example_input`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs, batch first), or a random
    batch inferred from the first layer; when none can be inferred the probe is skipped
    with a warning (``probe=False`` skips it silently). The model is left as it was.
    Returns ``model``, so ``make_private(module=check_model(m), ...)`` reads naturally.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(probe, bool):
        raise TypeError(f"probe must be a bool, got {type(probe).__name__}")
    use_opacus = _opacus_available() if opacus is None else bool(opacus)
    problems = _opacus_problems(model) if use_opacus else []
    problems = _merge(problems, type_problems(model))
    if probe:
        problems = _merge(problems, _probe(model, example_input))
    if problems:
        raise PrivacyModelError(problems)
    return model


def _merge(known: list[ModelProblem], more: list[ModelProblem]) -> list[ModelProblem]:
    """``known`` plus the problems of ``more`` about sub-modules ``known`` does not name."""
    named = {p.name for p in known}
    return known + [p for p in more if p.name not in named]


def type_problems(model: nn.Module, *, training_only: bool = False) -> list[ModelProblem]:
    """Layers known to mix examples or keep batch statistics in training mode.

    ``training_only=True`` skips modules in eval mode (what ``torch.func`` per-example
    gradients of the model as it is need); the default flags them for training.
    """
    problems = []
    for name, sub in model.named_modules():
        if training_only and not sub.training:
            continue
        kind = type(sub).__name__
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            problems.append(ModelProblem(name, kind, BATCHNORM_MIXES, BATCHNORM_FIX))
        elif isinstance(sub, nn.modules.instancenorm._InstanceNorm) and sub.track_running_stats:
            problems.append(ModelProblem(name, kind, RUNNING_STATS, BUFFER_FIX))
    return problems


def _probe(model: nn.Module, example_input: Any) -> list[ModelProblem]:
    if any(nn.parameter.is_lazy(p) for p in model.parameters()):  # a forward would set them
        _warn.warn(
            "check_model: the model has uninitialised (lazy) parameters, so the independence "
            "probe did not run; run one forward pass first"
        )
        return []
    if example_input is not None:
        try:
            return independence_problems(model, example_input)
        except (TypeError, ValueError) as error:
            raise type(error)(f"example_input: {error}") from error
        except Exception as error:  # the model's own forward failed on it
            raise ValueError(
                f"example_input: the model's forward failed on it ({type(error).__name__}: {error})"
            ) from error
    first_error = None
    for candidate in probe_inputs(model):
        try:
            return independence_problems(model, candidate)
        except Exception as error:  # a guessed shape the model does not take
            first_error = first_error or error
    if first_error is None:
        _warn.warn(
            "check_model: no example input could be inferred from the model's first layer, "
            f"so only known layer types were checked for mixing examples; {_PASS}"
        )
    else:
        _warn.warn(
            f"check_model: the independence probe could not run on an inferred batch "
            f"({type(first_error).__name__}: {first_error}); {_PASS}"
        )
    return []


_PASS = "pass example_input= (a small batch) to run the independence probe"


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


def wrap_model(model: nn.Module, example_input: Any = None, **kwargs: object) -> nn.Module:
    """``opacus.GradSampleModule(model, **kwargs)``, after :func:`check_model`.

    Opacus errors raised while wrapping come back as :class:`PrivacyModelError`.
    """
    check_model(model, example_input, opacus=True)
    from opacus import GradSampleModule

    try:
        return GradSampleModule(model, **kwargs)
    except (NotImplementedError, ValueError) as error:
        problem = ModelProblem("", type(model).__name__, f"{type(error).__name__}: {error}")
        raise PrivacyModelError([problem]) from None

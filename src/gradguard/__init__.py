"""gradguard: measure, diagnose and guard the gradients of PyTorch training runs.

The names below load on first use (PEP 562), so ``import gradguard.health`` or
``gradguard.schema`` (the host-side parts, which need only numpy) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "adaptive_clip_grad_",
            "clip_coefficient",
            "clip_grad_norm_",
            "clip_grad_value_",
            "clip_grads_with_norm_",
            "clip_tensor_norms_",
            "get_total_norm",
        ),
        "functional",
    ),
    "Guard": "guard",
    "StepResult": "guard",
    "HealthConfig": "health",
    "recommend_threshold": "health",
    **dict.fromkeys(
        (
            "AGC",
            "AdaptiveTensorClip",
            "AutoClip",
            "ClipNorm",
            "ClipTensorNorm",
            "ClipValue",
            "FeedbackClip",
            "GradientNoise",
            "Monitor",
            "Policy",
            "SkipNonFinite",
            "SkipSpike",
            "ZClip",
            "chain",
            "default_policy",
        ),
        "policies",
    ),
    "Recorder": "record",
    "Rewind": "rewind",
    "RunStore": "record",
    "StoreError": "record",
    **dict.fromkeys(("GradStats", "HostStats", "LayerNorms", "measure"), "stats"),
}

__all__ = [
    "AGC",
    "AdaptiveTensorClip",
    "AutoClip",
    "ClipNorm",
    "ClipTensorNorm",
    "ClipValue",
    "FeedbackClip",
    "GradStats",
    "GradientNoise",
    "Guard",
    "HealthConfig",
    "HostStats",
    "LayerNorms",
    "Monitor",
    "Policy",
    "Recorder",
    "Rewind",
    "RunStore",
    "SkipNonFinite",
    "SkipSpike",
    "StepResult",
    "StoreError",
    "ZClip",
    "__version__",
    "adaptive_clip_grad_",
    "chain",
    "clip_coefficient",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_tensor_norms_",
    "default_policy",
    "get_total_norm",
    "measure",
    "recommend_threshold",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a subpackage, as after an eager import: ``gg.record.TensorBoardSink``
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the subpackage exists but needs something missing: say what
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .functional import (
        adaptive_clip_grad_,
        clip_coefficient,
        clip_grad_norm_,
        clip_grad_value_,
        clip_grads_with_norm_,
        clip_tensor_norms_,
        get_total_norm,
    )
    from .guard import Guard, StepResult
    from .health import HealthConfig, recommend_threshold
    from .policies import (
        AGC,
        AdaptiveTensorClip,
        AutoClip,
        ClipNorm,
        ClipTensorNorm,
        ClipValue,
        FeedbackClip,
        GradientNoise,
        Monitor,
        Policy,
        SkipNonFinite,
        SkipSpike,
        ZClip,
        chain,
        default_policy,
    )
    from .record import Recorder, RunStore, StoreError
    from .rewind import Rewind
    from .stats import GradStats, HostStats, LayerNorms, measure

"""gradguard: measure, diagnose and guard the gradients of PyTorch training runs."""

from ._version import __version__
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

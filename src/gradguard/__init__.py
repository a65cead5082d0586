"""gradguard: measure, diagnose and guard the gradients of PyTorch training runs."""

from .functional import (
    adaptive_clip_grad_,
    clip_coefficient,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    clip_tensor_norms_,
    get_total_norm,
)
from .stats import GradStats, HostStats, LayerNorms, measure

__version__ = "0.1.0"

__all__ = [
    "GradStats",
    "HostStats",
    "LayerNorms",
    "__version__",
    "adaptive_clip_grad_",
    "clip_coefficient",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_tensor_norms_",
    "get_total_norm",
    "measure",
]
